"""TPU int8 matmuls (weight-only and W8A8), Mosaic Pallas.

Grid (M / bm, N / bn, K / bk). Each step multiplies an [bm, bk] activation tile by an int8
[bn, bk] weight tile, contracting both on K, so the weight is read in its stored [out, in]
layout with no transpose copy. A VMEM accumulator lives across the K axis ("arbitrary"): zeroed
at k == 0, scaled and stored at the last k. M and N are "parallel" (megacore).

Weight-only: the int8 tile is cast to x's dtype (exact for |w| <= 127) and accumulated in
float32. W8A8: x is quantized per token in XLA first (fused into the same jit), then int8 x int8
accumulates in int32, which uses the int8 MXU on chips that have one; the int32 sum is rescaled
by x_scale[m] * w_scale[n] once at the end.

Per-group scales [N, G]: each step needs the scales of its bk / group_size groups; they are
passed as [K / bk, bk / group_size, N] (a small transposed copy of the scales, never of the
weight) so one [bk / group_size, bn] tile per step spans its full second-to-last dim, which the
TPU tiling rules allow at any size. Each group's partial product is scaled, then accumulated in
float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.int8_matmul import reference, validation

DEFAULT_BLOCKS = (256, 512, 1024)  # (block_m, block_n, block_k) targets; decode is K/N bound


def _grouped_product(x_ref, w_ref, s_ref) -> jax.Array:
  """Sum over the block's groups of (x_g @ w_g.T) * scale_g: float32 [bm, bn]."""
  gpb = s_ref.shape[0]
  gs = x_ref.shape[1] // gpb
  total_MxN = None
  for g in range(gpb):  # static, lane-aligned slices (group_size % 128 == 0 when gpb > 1)
    cols = pl.ds(g * gs, gs)
    part_MxN = reference.dot_nt(x_ref[:, cols], w_ref[:, cols]).astype(jnp.float32)
    part_MxN = part_MxN * s_ref[pl.ds(g, 1), :]
    total_MxN = part_MxN if total_MxN is None else total_MxN + part_MxN
  return total_MxN


def _kernel(*refs, grouped: bool, w8a8: bool):
  """One (m, n, k) step; refs: x, w_q, scales, [x_scale], out, acc scratch."""
  x_ref, w_ref, s_ref = refs[:3]
  xs_ref = refs[3] if w8a8 else None
  o_ref, acc_ref = refs[-2:]
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  if grouped:
    acc_ref[...] += _grouped_product(x_ref, w_ref, s_ref)
  else:
    acc_ref[...] += reference.dot_nt(x_ref[...], w_ref[...])

  @pl.when(k == pl.num_programs(2) - 1)
  def _finish():
    w_scale_1xN = None if grouped else s_ref[...]
    x_scale_Mx1 = xs_ref[...] if w8a8 else None
    o_ref[...] = reference.apply_scales(acc_ref[...], w_scale_1xN, x_scale_Mx1).astype(
        o_ref.dtype)


def _scale_operand(scales, block_n: int, block_k: int, k: int):
  """(array, BlockSpec) of the weight scales: [1, N] per channel, [K/bk, bk/gs, N] per group."""
  n = scales.shape[0]
  if scales.ndim == 1:
    return scales.reshape(1, n), pl.BlockSpec((1, block_n), lambda i, j, kk: (0, j))
  gpb = block_k // (k // scales.shape[1])
  scales_KbxGbxN = scales.T.reshape(k // block_k, gpb, n)
  return scales_KbxGbxN, pl.BlockSpec((pl.Squeezed(), gpb, block_n),
                                      lambda i, j, kk: (kk, 0, j))


@functools.partial(jax.jit, static_argnames=("w8a8", "block_m", "block_n", "block_k",
                                             "interpret"))
def _int8_matmul_tpu(x_MxK, w_q_NxK, scales, *, w8a8: bool, block_m: int, block_n: int,
                     block_k: int, interpret: bool | pltpu.InterpretParams) -> jax.Array:
  """The pallas_call on [M, K]; inputs validated, M padded here to a multiple of block_m."""
  (m, k), n = x_MxK.shape, w_q_NxK.shape[0]
  mp = pl.cdiv(m, block_m) * block_m
  operands, x_scale = [x_MxK], None
  if w8a8:
    operands[0], x_scale = reference.quantize_per_token(x_MxK)
  operands[0] = jnp.pad(operands[0], ((0, mp - m), (0, 0)))
  s_op, s_spec = _scale_operand(scales, block_n, block_k, k)
  operands += [w_q_NxK, s_op]
  in_specs = [pl.BlockSpec((block_m, block_k), lambda i, j, kk: (i, kk)),
              pl.BlockSpec((block_n, block_k), lambda i, j, kk: (j, kk)), s_spec]
  if w8a8:
    operands.append(jnp.pad(x_scale, (0, mp - m))[:, None])
    in_specs.append(pl.BlockSpec((block_m, 1), lambda i, j, kk: (i, 0)))
  grouped = scales.ndim == 2
  acc_dtype = jnp.int32 if w8a8 and not grouped else jnp.float32
  out_MpxN = pl.pallas_call(
      functools.partial(_kernel, grouped=grouped, w8a8=w8a8),
      grid=(mp // block_m, n // block_n, k // block_k),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, kk: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), x_MxK.dtype),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), acc_dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*operands)
  return out_MpxN[:m]


def resolve_blocks(dims: validation.Dims, act_dtype, block_m: int | None, block_n: int | None,
                   block_k: int | None) -> tuple[int, int, int]:
  """Fills default blocks with TPU-tileable divisors; block_m is capped at the padded M."""
  rows = validation.tpu_rows(act_dtype)
  block_m = DEFAULT_BLOCKS[0] if block_m is None else block_m
  block_m = min(block_m, pl.cdiv(max(dims.m, 1), rows) * rows)
  if block_n is None:
    block_n = validation.pick_block(dims.n, DEFAULT_BLOCKS[1], validation.tpu_lane_ok(dims.n))
  if block_k is None:
    gs, lane_ok = dims.k_unit, validation.tpu_lane_ok(dims.k)
    ok = lambda d: lane_ok(d) and d % gs == 0 and (d == gs or gs % 128 == 0 or gs == 1)
    block_k = validation.pick_block(dims.k, DEFAULT_BLOCKS[2], ok)
  return block_m, block_n, block_k


def _run(x, w_q_NxK, scales, *, w8a8: bool, block_m: int | None, block_n: int | None,
         block_k: int | None, interpret: bool | pltpu.InterpretParams) -> jax.Array:
  """Validates, picks blocks, flattens x's leading dims and calls the kernel."""
  dims = validation.check_inputs(x, w_q_NxK, scales)
  if dims.m == 0:  # an empty batch: a zero-size grid would not lower
    return jnp.zeros((*x.shape[:-1], dims.n), x.dtype)
  act_dtype = jnp.int8 if w8a8 else x.dtype
  bm, bn, bk = resolve_blocks(dims, act_dtype, block_m, block_n, block_k)
  validation.check_blocks(dims, bm, bn, bk, ok_n=validation.tpu_lane_ok(dims.n),
                          ok_k=validation.tpu_lane_ok(dims.k))
  if not interpret:
    validation.check_tpu_tiling(dims, bm, bn, bk, act_dtype)
  out_MxN = _int8_matmul_tpu(x.reshape(dims.m, dims.k), w_q_NxK, scales, w8a8=w8a8,
                             block_m=bm, block_n=bn, block_k=bk, interpret=interpret)
  return out_MxN.reshape(*x.shape[:-1], dims.n)


def int8_matmul_tpu(x: jax.Array, w_q_NxK: jax.Array, scales: jax.Array, *,
                    block_m: int | None = None, block_n: int | None = None,
                    block_k: int | None = None,
                    interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
  """Weight-only int8 matmul on TPU; same contract as `ref_int8_matmul`: [..., K] -> [..., N].

  block_m / block_n / block_k: tile sizes (None: the largest TPU-tileable divisors of N and K
  up to 512 / 1024; M is padded to block_m, capped at M rounded up to the sublane tile).
  interpret=True runs anywhere (CPU) and skips the TPU tiling checks;
  interpret=pltpu.InterpretParams() also simulates TPU memory spaces and DMAs (slower).
  """
  return _run(x, w_q_NxK, scales, w8a8=False, block_m=block_m, block_n=block_n,
              block_k=block_k, interpret=interpret)


def int8_matmul_w8a8_tpu(x: jax.Array, w_q_NxK: jax.Array, scales: jax.Array, *,
                         block_m: int | None = None, block_n: int | None = None,
                         block_k: int | None = None,
                         interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
  """W8A8 int8 matmul on TPU (int32 accumulation); same contract as `ref_int8_matmul_w8a8`.

  x is quantized per token inside the same jit; block sizes and interpret as `int8_matmul_tpu`
  (block_m rounds to 32 rows: int8 activation tiles).
  """
  return _run(x, w_q_NxK, scales, w8a8=True, block_m=block_m, block_n=block_n,
              block_k=block_k, interpret=interpret)
