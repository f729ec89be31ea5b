"""Pure-JAX int8 matmuls: the ground truth the Pallas kernels are tested against.

Layout (jinfer's): weights w_q [N, K] int8 (out, in) with float32 scales per output channel
[N] or per group of K [N, G] (group_size = K // G). Weight-only ("W8A16"):
y = (x @ w_q.T) * scale, accumulated in float32 with the scale applied after accumulating
(per group: every group's partial sum is scaled, then summed). W8A8 also quantizes x per token
(symmetric, absmax / 127) and accumulates int8 x int8 in int32. Outputs take x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127.0


def dot_nt(x_MxK: jax.Array, w_NxK: jax.Array) -> jax.Array:
  """x @ w.T, as the kernels compute it: int32 for int8 x int8, else float32 accumulation.

  int8 weights are cast to x's dtype first: |w| <= 127 is exact in bfloat16 and float32.
  float32 runs at full precision: not one bf16 MXU pass on TPU, not TF32 on GPU.
  """
  dims = (((1,), (1,)), ((), ()))
  if x_MxK.dtype == jnp.int8:
    return jax.lax.dot_general(x_MxK, w_NxK, dims, preferred_element_type=jnp.int32)
  precision = jax.lax.Precision.HIGHEST if x_MxK.dtype == jnp.float32 else None
  return jax.lax.dot_general(x_MxK, w_NxK.astype(x_MxK.dtype), dims, precision=precision,
                             preferred_element_type=jnp.float32)


def apply_scales(acc_MxN: jax.Array, w_scale_1xN: jax.Array | None,
                 x_scale_Mx1: jax.Array | None) -> jax.Array:
  """acc (int32 or float32) -> float32 times the per-token then per-channel scales.

  One order shared with the kernels, so a W8A8 int32 result is rescaled bit-identically.
  """
  out_MxN = acc_MxN.astype(jnp.float32)
  if x_scale_Mx1 is not None:
    out_MxN = out_MxN * x_scale_Mx1
  if w_scale_1xN is not None:
    out_MxN = out_MxN * w_scale_1xN
  return out_MxN


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-row int8 quantization of x [..., K] -> (x_q int8 [..., K], scale f32 [...]).

  scale = absmax / 127 and x ~= x_q * scale; an all-zero row gets scale 0 and x_q 0.
  """
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX
  safe = jnp.where(scale > 0, scale, 1.0)
  x_q = jnp.clip(jnp.round(x32 / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return x_q, scale


def _grouped(x_MxGxS: jax.Array, w_NxGxS: jax.Array) -> jax.Array:
  """Per-group partial products [M, N, G] (int32 for int8 x int8, else float32)."""
  if x_MxGxS.dtype == jnp.int8:
    return jnp.einsum("MGS,NGS->MNG", x_MxGxS, w_NxGxS, preferred_element_type=jnp.int32)
  return jnp.einsum("MGS,NGS->MNG", x_MxGxS.astype(jnp.float32), w_NxGxS.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _matmul(x_MxK: jax.Array, w_q_NxK: jax.Array, scales: jax.Array,
            x_scale_M: jax.Array | None) -> jax.Array:
  """Float32 [M, N]: per-channel (scales [N]) or per-group (scales [N, G]) dequantized product."""
  x_scale_Mx1 = None if x_scale_M is None else x_scale_M[:, None]
  if scales.ndim == 1:
    return apply_scales(dot_nt(x_MxK, w_q_NxK), scales[None, :], x_scale_Mx1)
  (m, k), (n, g) = x_MxK.shape, scales.shape
  part_MxNxG = _grouped(x_MxK.reshape(m, g, k // g), w_q_NxK.reshape(n, g, k // g))
  out_MxN = jnp.sum(part_MxNxG.astype(jnp.float32) * scales[None], axis=-1)
  return apply_scales(out_MxN, None, x_scale_Mx1)


def ref_int8_matmul(x: jax.Array, w_q_NxK: jax.Array, scales: jax.Array) -> jax.Array:
  """Weight-only int8 matmul: x [..., K] (float32/bfloat16) -> [..., N] in x's dtype.

  scales: float32 [N] (per output channel) or [N, G] (per group of K // G inputs).
  """
  x_MxK = x.reshape(-1, x.shape[-1])
  out_MxN = _matmul(x_MxK, w_q_NxK, scales, None)
  return out_MxN.reshape(*x.shape[:-1], w_q_NxK.shape[0]).astype(x.dtype)


def ref_int8_matmul_w8a8(x: jax.Array, w_q_NxK: jax.Array, scales: jax.Array) -> jax.Array:
  """W8A8: x quantized per token, int8 x int8 accumulated in int32; [..., N] in x's dtype."""
  x_q_MxK, x_scale_M = quantize_per_token(x.reshape(-1, x.shape[-1]))
  out_MxN = _matmul(x_q_MxK, w_q_NxK, scales, x_scale_M)
  return out_MxN.reshape(*x.shape[:-1], w_q_NxK.shape[0]).astype(x.dtype)
