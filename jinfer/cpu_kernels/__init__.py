"""Native CPU kernels for decode steps (matmuls of few rows, one-token attention), called from
XLA through its FFI.

XLA:CPU reads float32 weights at near memory bandwidth but converts int8, int4 and bfloat16
weights to a float32 copy before every dot, so smaller weights decode *slower* than float32.
These kernels (kernels.cc) convert in registers instead, so decode time follows the bytes read.
They take x [..., K] and an [N, K] weight (float32, bfloat16, int8 codes + scales, or packed
int4 codes + float16 scales + offsets) and return x @ W.T as [..., N]; with a
`jinfer.models.fusion.MatmulFusion` the same call also applies the RMSNorm or SwiGLU before and
the residual add after (for float32 activations; XLA does them otherwise). `decode_rope_attention` fuses
a decode step's RoPE, cache write and attention over a contiguous cache, which XLA compiles to
a dozen small ops and a scatter per layer; `paged_decode_rope_attention` does the same over a
paged pool, reading and writing pages in place.

Each entry point takes the XLA computation it replaces (`fallback`) and uses it when the kernel
does not apply: on other platforms (chosen per platform at lowering), for more than `MAX_ROWS`
rows (prefill, where XLA's blocked GEMM is compute-efficient), for K or groups that do not
divide by 32, or when the kernels could not be built (`build.load`; JINFER_CPU_KERNELS=0
turns them off).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cpu_kernels import build
from jinfer.models.fusion import MatmulFusion
from pallas_kernels.int8_matmul.reference import quantize_per_token

MAX_ROWS = 16  # beyond this many x rows, XLA's GEMM beats a weight-streaming kernel
MAX_INT4_GROUPS = 2048  # the int4 kernel's per-row scale buffer (kMaxGroups in kernels.cc)
ALIGN = 32  # K and every scale group must divide by this (the kernels' unrolled step)


def available() -> bool:
  """True when the kernels are built and registered for this process."""
  return build.load()


def float_matmul(x_BxTxK: jax.Array, w_NxK: jax.Array, fallback: Callable[[], jax.Array],
                 out_dtype=None, fusion: Optional[MatmulFusion] = None) -> jax.Array:
  """x @ w.T for a float32 or bfloat16 weight (`fusion` applied around it; `fallback`
  computes the whole result, fusion included, where the kernel does not apply)."""
  target = {jnp.dtype(jnp.float32): "jinfer_matmul_f32",
            jnp.dtype(jnp.bfloat16): "jinfer_matmul_bf16"}.get(jnp.dtype(w_NxK.dtype))
  return _call(target, x_BxTxK, (w_NxK,), w_NxK.shape, None, fallback, out_dtype,
               fusion=fusion)


def int8_matmul(x_BxTxK: jax.Array, codes_NxK: jax.Array, scales: jax.Array,
                fallback: Callable[[], jax.Array], out_dtype=None,
                quantize_activations: bool = False,
                fusion: Optional[MatmulFusion] = None) -> jax.Array:
  """x @ (codes * scales).T; scales [N] per row or [N, G] per group of K // G inputs.

  quantize_activations (W8A8): x is quantized per token first. Its integer codes go through
  the same kernel (products and sums of small integers are exact in float32) and the token
  scale is applied after, which equals int8 x int8 -> int32 accumulation.
  """
  group = None if scales.ndim == 1 else codes_NxK.shape[1] // scales.shape[1]
  return _call("jinfer_matmul_int8", x_BxTxK, (codes_NxK, scales), codes_NxK.shape, group,
               fallback, out_dtype, quantize_activations, fusion)


def int4_matmul(x_BxTxK: jax.Array, packed_NxK2: jax.Array, scales_NxG: jax.Array,
                offsets_NxG: jax.Array, fallback: Callable[[], jax.Array],
                out_dtype=None, fusion: Optional[MatmulFusion] = None) -> jax.Array:
  """x @ (codes * scales + offsets).T for two 4-bit codes per byte (even input low); the
  kernel reads float16 scales and offsets.

  On CPUs with AVX-512 VNNI or AVX2 the kernel multiplies in integers: each block of 32 inputs
  of x is represented as d * (q1 + q2 / 256) with int8 q1, q2 and d = max|x| / 127 (about 15
  bits per input; an output is off by at most sum_k |w[n, k]| * d(k) / 256). Elsewhere x stays
  float32.
  """
  out_features, in_features = packed_NxK2.shape[0], packed_NxK2.shape[1] * 2
  group = in_features // scales_NxG.shape[1]
  if scales_NxG.shape[1] > MAX_INT4_GROUPS:
    return fallback()
  return _call("jinfer_matmul_int4", x_BxTxK,
               (packed_NxK2, scales_NxG.astype(jnp.float16), offsets_NxG.astype(jnp.float16)),
               (out_features, in_features), group, fallback, out_dtype, fusion=fusion)


def decode_rope_attention(qkv_BxKxG2xH: jax.Array, cos_BxHh: jax.Array, sin_BxHh: jax.Array,
                          k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, positions_B: jax.Array,
                          fallback: Callable[[], tuple[jax.Array, jax.Array, jax.Array]]
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A decode step's attention from the q/k/v projection [B, K, G + 2, H]: RoPE (cos/sin
  [B, H/2]) on the queries and keys, the key and value written at each row's position of a
  contiguous cache that keeps position p in slot p (dropped outside [0, S)), then causal
  attention over slots 0..p. Returns (out [B, N, H] in qkv's dtype, k cache, v cache); the
  caches are updated in place (aliased), one slot per row."""
  target = {jnp.dtype(jnp.float32): "jinfer_decode_rope_attention_f32",
            jnp.dtype(jnp.bfloat16): "jinfer_decode_rope_attention_bf16"
            }.get(jnp.dtype(k_BxKxSxH.dtype))
  if target is None or v_BxKxSxH.dtype != k_BxKxSxH.dtype or not build.load():
    return fallback()
  b, kv_heads, g2, h = qkv_BxKxG2xH.shape

  def on_cpu():
    out_types = (jax.ShapeDtypeStruct((b, kv_heads * (g2 - 2), h), jnp.float32),
                 jax.ShapeDtypeStruct(k_BxKxSxH.shape, k_BxKxSxH.dtype),
                 jax.ShapeDtypeStruct(v_BxKxSxH.shape, v_BxKxSxH.dtype))
    out, k, v = jax.ffi.ffi_call(target, out_types, input_output_aliases={3: 1, 4: 2})(
        qkv_BxKxG2xH.astype(jnp.float32), cos_BxHh.astype(jnp.float32),
        sin_BxHh.astype(jnp.float32), k_BxKxSxH, v_BxKxSxH, positions_B.astype(jnp.int32),
        # A bfloat16 model rounds RoPE'd queries and keys to bfloat16, as XLA's path does.
        round_to_bf16=qkv_BxKxG2xH.dtype == jnp.bfloat16)
    return out.astype(qkv_BxKxG2xH.dtype), k, v

  return jax.lax.platform_dependent(cpu=on_cpu, default=fallback)


_PAGED_DECODE_ROPE_ATTENTION = {
    jnp.dtype(jnp.float32): "jinfer_paged_decode_rope_attention_f32",
    jnp.dtype(jnp.bfloat16): "jinfer_paged_decode_rope_attention_bf16"}


def has_paged_decode_rope_attention(dtype) -> bool:
  """Whether `paged_decode_rope_attention` runs the kernel (not its fallback) for pools of
  `dtype` on this process's default backend."""
  return (jax.default_backend() == "cpu" and jnp.dtype(dtype) in _PAGED_DECODE_ROPE_ATTENTION
          and build.load())


def paged_decode_rope_attention(qkv_BxKxG2xH: jax.Array, cos_BxHh: jax.Array,
                                sin_BxHh: jax.Array, k_pages_KxPxSxH: jax.Array,
                                v_pages_KxPxSxH: jax.Array, page_tables_BxM: jax.Array,
                                positions_B: jax.Array,
                                fallback: Callable[[], tuple[jax.Array, jax.Array, jax.Array]]
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`decode_rope_attention` over a paged pool: position p of row b is in page
  page_tables[b, p // S_page] at slot p % S_page (a write to an entry holding no page is
  dropped; a read of one gives zeros). Every row's key and value are written before any row
  attends, so rows may be the tokens of one sequence (an engine's packed prefill). Returns
  (out [B, N, H] in qkv's dtype, k pool, v pool), the pools updated in place."""
  target = _PAGED_DECODE_ROPE_ATTENTION.get(jnp.dtype(k_pages_KxPxSxH.dtype))
  if target is None or v_pages_KxPxSxH.dtype != k_pages_KxPxSxH.dtype or not build.load():
    return fallback()
  b, kv_heads, g2, h = qkv_BxKxG2xH.shape

  def on_cpu():
    out_types = (jax.ShapeDtypeStruct((b, kv_heads * (g2 - 2), h), jnp.float32),
                 jax.ShapeDtypeStruct(k_pages_KxPxSxH.shape, k_pages_KxPxSxH.dtype),
                 jax.ShapeDtypeStruct(v_pages_KxPxSxH.shape, v_pages_KxPxSxH.dtype))
    out, k, v = jax.ffi.ffi_call(target, out_types, input_output_aliases={3: 1, 4: 2})(
        qkv_BxKxG2xH.astype(jnp.float32), cos_BxHh.astype(jnp.float32),
        sin_BxHh.astype(jnp.float32), k_pages_KxPxSxH, v_pages_KxPxSxH,
        page_tables_BxM.astype(jnp.int32), positions_B.astype(jnp.int32),
        round_to_bf16=qkv_BxKxG2xH.dtype == jnp.bfloat16)
    return out.astype(qkv_BxKxG2xH.dtype), k, v

  return jax.lax.platform_dependent(cpu=on_cpu, default=fallback)


def _call(target: Optional[str], x_BxTxI: jax.Array, weights: tuple, weight_shape: tuple,
          group: Optional[int], fallback: Callable[[], jax.Array], out_dtype,
          quantize_activations: bool = False,
          fusion: Optional[MatmulFusion] = None) -> jax.Array:
  """x @ W.T for an [N, K] weight through the kernel `target`, with `fusion` around it; x is
  [..., K], or [..., 2K] for a SwiGLU input."""
  fusion = fusion or MatmulFusion()
  out_features, in_features = weight_shape
  *lead, _ = x_BxTxI.shape
  rows = math.prod(lead)
  if (target is None or rows > MAX_ROWS or in_features % ALIGN
      or (group is not None and group % ALIGN) or not build.load()):
    return fallback()
  out_dtype = out_dtype or x_BxTxI.dtype
  # In the kernel only for float32 activations: a bfloat16 model rounds between these ops.
  in_kernel = (not quantize_activations and x_BxTxI.dtype == jnp.float32
               and (fusion.residual is None or fusion.residual.dtype == jnp.float32))

  def on_cpu():
    x_BxTxK = x_BxTxI if in_kernel else fusion.input(x_BxTxI)
    x_MxK = x_BxTxK.reshape(rows, -1).astype(jnp.float32)
    if quantize_activations:
      x_codes_MxK, x_scale_M = quantize_per_token(x_MxK)
      x_MxK = x_codes_MxK.astype(jnp.float32)
    none = jnp.zeros((0,), jnp.float32)
    norm_K = fusion.norm_weight if in_kernel and fusion.norm_weight is not None else none
    residual_MxN = (fusion.residual.reshape(rows, out_features)
                    if in_kernel and fusion.residual is not None else none)
    y_MxN = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, out_features), jnp.float32))(
        x_MxK, *weights, norm_K.astype(jnp.float32), residual_MxN,
        norm_eps=np.float32(fusion.norm_eps), swiglu=in_kernel and fusion.swiglu)
    if quantize_activations:
      y_MxN = y_MxN * x_scale_M[:, None]
    y = y_MxN.reshape(*lead, out_features).astype(out_dtype)
    return y if in_kernel else fusion.output(y)

  return jax.lax.platform_dependent(cpu=on_cpu, default=fallback)
