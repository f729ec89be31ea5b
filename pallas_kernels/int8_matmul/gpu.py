"""GPU int8 matmuls (weight-only and W8A8), Triton-style Pallas.

Grid (M / bm, N / bn). Each program owns one [bm, bn] output tile and loops over K
(lax.fori_loop) in [bm, bk] x [bn, bk] slices of its row block of x and of the int8 weight,
read in the stored [out, in] layout (tl.dot takes the transposed operand). Weight-only casts
the int8 slice to x's dtype (exact) and accumulates in float32; W8A8 quantizes x per token in
XLA first (same jit) and accumulates int8 x int8 in int32 (tensor-core IMMA), rescaled once by
x_scale[m] * w_scale[n] at the end. Per-group scales [N, G] are passed transposed, [G, N], and
each group's partial product is scaled before it is added to the float32 accumulator.

Decode (small M) is bound by reading the weight: the default tile is narrow in N (32 rows of
the weight per program for M <= 16) so N / bn programs keep the SMs busy without a split-K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.int8_matmul import reference, validation

try:  # The Triton lowering's params (deprecated since jax 0.11; Mosaic GPU is the default).
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
  pl_triton = None

DEFAULT_BLOCK_M, DEFAULT_BLOCK_K = 64, 256


def _next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def _step_product(x_ref, w_ref, s_ref, step, *, block_k: int, group_size: int | None):
  """x[:, ks] @ w[:, ks].T for the K slice of this step; per-group scaled when grouped."""
  start = pl.multiple_of(step * block_k, block_k)
  if group_size is None:
    cols = pl.ds(start, block_k)
    return reference.dot_nt(x_ref[:, cols], w_ref[:, cols])
  total_MxN = None
  gpb = block_k // group_size
  for g in range(gpb):  # static: one tl.dot per group, scaled by its [1, bn] scale row
    cols = pl.ds(start + g * group_size, group_size)
    part_MxN = reference.dot_nt(x_ref[:, cols], w_ref[:, cols]).astype(jnp.float32)
    part_MxN = part_MxN * s_ref[pl.ds(step * gpb + g, 1), :]
    total_MxN = part_MxN if total_MxN is None else total_MxN + part_MxN
  return total_MxN


def _kernel(*refs, block_k: int, group_size: int | None, w8a8: bool):
  """One [bm, bn] output tile; refs: x [bm, K], w_q [bn, K], scales, [x_scale [bm, 1]], out."""
  x_ref, w_ref, s_ref = refs[:3]
  o_ref = refs[-1]
  grouped = group_size is not None
  acc_dtype = jnp.int32 if w8a8 and not grouped else jnp.float32
  body = lambda step, acc: acc + _step_product(x_ref, w_ref, s_ref, step, block_k=block_k,
                                               group_size=group_size)
  acc_MxN = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body,
                              jnp.zeros(o_ref.shape, acc_dtype))
  w_scale_1xN = None if grouped else s_ref[...]
  x_scale_Mx1 = refs[3][...] if w8a8 else None
  o_ref[...] = reference.apply_scales(acc_MxN, w_scale_1xN, x_scale_Mx1).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("w8a8", "block_m", "block_n", "block_k",
                                             "num_warps", "num_stages", "interpret"))
def _int8_matmul_gpu(x_MxK, w_q_NxK, scales, *, w8a8: bool, block_m: int, block_n: int,
                     block_k: int, num_warps: int, num_stages: int,
                     interpret: bool) -> jax.Array:
  """The pallas_call on [M, K]; inputs validated, M padded here to a multiple of block_m."""
  (m, k), n = x_MxK.shape, w_q_NxK.shape[0]
  mp = pl.cdiv(m, block_m) * block_m
  x_op, x_scale = (reference.quantize_per_token(x_MxK) if w8a8 else (x_MxK, None))
  grouped = scales.ndim == 2
  s_GxN = scales.T if grouped else scales[None, :]
  operands = [jnp.pad(x_op, ((0, mp - m), (0, 0))), w_q_NxK, s_GxN]
  in_specs = [pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
              pl.BlockSpec((block_n, k), lambda i, j: (j, 0)),
              pl.BlockSpec((s_GxN.shape[0], block_n), lambda i, j: (0, j))]
  if w8a8:
    operands.append(jnp.pad(x_scale, (0, mp - m))[:, None])
    in_specs.append(pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)))
  compiler_params = None
  if pl_triton is not None and not interpret:
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  kernel = functools.partial(_kernel, block_k=block_k, w8a8=w8a8,
                             group_size=k // scales.shape[1] if grouped else None)
  out_MpxN = pl.pallas_call(
      kernel,
      grid=(mp // block_m, n // block_n),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), x_MxK.dtype),
      compiler_params=compiler_params,
      interpret=interpret,
  )(*operands)
  return out_MpxN[:m]


def resolve_blocks(dims: validation.Dims, block_m: int | None, block_n: int | None,
                   block_k: int | None) -> tuple[int, int, int]:
  """Fills default blocks with power-of-two divisors; block_m is capped at M's next power of 2."""
  block_m = DEFAULT_BLOCK_M if block_m is None else block_m
  block_m = min(block_m, max(16, _next_pow2(dims.m)))
  if block_n is None:
    block_n = validation.pick_block(dims.n, 32 if dims.m <= 16 else 64, validation.gpu_ok)
  if block_k is None:
    unit = dims.k_unit
    ok = lambda d: validation.gpu_ok(d) and d % unit == 0
    block_k = validation.pick_block(dims.k, max(DEFAULT_BLOCK_K, unit), ok)
  return block_m, block_n, block_k


def _run(x, w_q_NxK, scales, *, w8a8: bool, block_m: int | None, block_n: int | None,
         block_k: int | None, num_warps: int, num_stages: int, interpret: bool) -> jax.Array:
  """Validates, picks blocks, flattens x's leading dims and calls the kernel."""
  dims = validation.check_inputs(x, w_q_NxK, scales)
  if dims.m == 0:  # an empty batch: a zero-size grid would not lower
    return jnp.zeros((*x.shape[:-1], dims.n), x.dtype)
  bm, bn, bk = resolve_blocks(dims, block_m, block_n, block_k)
  validation.check_blocks(dims, bm, bn, bk, ok_n=validation.gpu_ok, ok_k=validation.gpu_ok)
  if not interpret:
    validation.check_gpu_tiling(dims, bm, bn, bk)
  out_MxN = _int8_matmul_gpu(x.reshape(dims.m, dims.k), w_q_NxK, scales, w8a8=w8a8,
                             block_m=bm, block_n=bn, block_k=bk, num_warps=num_warps,
                             num_stages=num_stages, interpret=interpret)
  return out_MxN.reshape(*x.shape[:-1], dims.n)


def int8_matmul_gpu(x: jax.Array, w_q_NxK: jax.Array, scales: jax.Array, *,
                    block_m: int | None = None, block_n: int | None = None,
                    block_k: int | None = None, num_warps: int = 4, num_stages: int = 3,
                    interpret: bool = False) -> jax.Array:
  """Weight-only int8 matmul on GPU; same contract as `ref_int8_matmul`: [..., K] -> [..., N].

  block_m / block_n / block_k: tile sizes (None: power-of-two divisors of N and K, bn 32 for
  M <= 16 else 64, bk up to 256; M is padded to block_m, capped at M's next power of two
  and at least 16). num_warps / num_stages: Triton launch parameters. interpret=True runs
  anywhere (CPU) and skips the GPU tiling checks.
  """
  return _run(x, w_q_NxK, scales, w8a8=False, block_m=block_m, block_n=block_n,
              block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def int8_matmul_w8a8_gpu(x: jax.Array, w_q_NxK: jax.Array, scales: jax.Array, *,
                         block_m: int | None = None, block_n: int | None = None,
                         block_k: int | None = None, num_warps: int = 4, num_stages: int = 3,
                         interpret: bool = False) -> jax.Array:
  """W8A8 int8 matmul on GPU (int32 accumulation); same contract as `ref_int8_matmul_w8a8`.

  x is quantized per token inside the same jit; tuning as `int8_matmul_gpu`.
  """
  return _run(x, w_q_NxK, scales, w8a8=True, block_m=block_m, block_n=block_n,
              block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
