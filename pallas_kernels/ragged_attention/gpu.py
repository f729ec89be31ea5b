"""GPU ragged paged attention, Triton-style Pallas: packed prefill chunks and decode tokens in
one kernel.

Grid (W work items, K KV heads). A program takes one item's [G' * BQ, H] query tile (G' = the
group padded to a power of two, BQ queries of one sequence; `schedule.work_items`) and loops
over the pages its queries see, `pages_per_block` at a time, gathering them from the pool by id
(the item's page-table row and its span come in as small per-item arrays: Triton has no scalar
prefetch). Each page is read once per block of queries. Slots of a block outside the visible
span re-read the span's first page, so no other page is ever loaded. The mask is per row, as in
the TPU kernel (`ragged_attention.tpu`), with the same treatment of rows that see nothing yet.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention import validation as paged_validation
from pallas_kernels.paged_attention.gpu import next_pow2, pl_triton
from pallas_kernels.ragged_attention import schedule
from pallas_kernels.ragged_attention import validation

SPAN_FIELDS = 4  # lo, hi, first position, rows


def _kernel(tables_ref, span_ref, q_ref, k_pages_ref, v_pages_ref, *refs, pages_per_block: int,
            queries_per_block: int, scale: float, soft_cap: float | None,
            sliding_window: int | None):
  """Online softmax over the item's visible pages -> its normalised [R, H] output.

  refs: (k_scales, v_scales,) for int8 pages, then the output.
  """
  scale_refs, o_ref = refs[:-1], refs[-1]
  rows, h = q_ref.shape
  num_pages, page_size = k_pages_ref.shape[0], k_pages_ref.shape[1]
  t = pages_per_block * page_size
  lo, hi, first_position, used = span_ref[0], span_ref[1], span_ref[2], span_ref[3]
  first_visible = lo // page_size
  first = first_visible // pages_per_block * pages_per_block  # aligned: loads stay in bounds
  end = pl.cdiv(hi, page_size)
  q_RxH = q_ref[...]
  query_R = jnp.arange(rows) & (queries_per_block - 1)
  q_pos_R = jnp.where(query_R < used, first_position + query_R, -1)  # unused slots see nothing

  def body(it, carry):
    o_RxH, m_R, l_R = carry
    start = first + it * pages_per_block
    ids_P = tables_ref[pl.ds(start, pages_per_block)]
    logical_P = start + jnp.arange(pages_per_block)
    in_span_P = (logical_P >= first_visible) & (logical_P < end)
    ids_P = jnp.where(in_span_P, ids_P, tables_ref[pl.ds(jnp.maximum(start, first_visible), 1)])
    ids_P = jnp.clip(ids_P, 0, num_pages - 1)
    k_TxH = k_pages_ref[ids_P].reshape(t, h)
    v_TxH = v_pages_ref[ids_P].reshape(t, h)
    if scale_refs:
      k_TxH, v_TxH = k_TxH.astype(q_RxH.dtype), v_TxH.astype(q_RxH.dtype)
    s_RxT = reference.dot_f32(q_RxH, k_TxH, contract_b=1) * scale
    if scale_refs:
      s_RxT = s_RxT * scale_refs[0][ids_P].reshape(1, t)
    s_RxT = reference.apply_soft_cap(s_RxT, soft_cap)
    pos_T = start * page_size + jnp.arange(t)
    visible_RxT = pos_T[None, :] <= q_pos_R[:, None]
    if sliding_window is not None:
      visible_RxT &= pos_T[None, :] > q_pos_R[:, None] - sliding_window
    s_RxT = jnp.where(visible_RxT, s_RxT, -jnp.inf)
    m_next_R = jnp.maximum(m_R, jnp.max(s_RxT, axis=1))
    m_safe_R = jnp.where(m_next_R == -jnp.inf, 0.0, m_next_R)  # rows that see nothing yet
    alpha_R = jnp.exp(m_R - m_safe_R)
    p_RxT = jnp.exp(s_RxT - m_safe_R[:, None])
    l_next_R = alpha_R * l_R + jnp.sum(p_RxT, axis=1)
    in_span_T = (pos_T >= lo) & (pos_T < hi)
    if scale_refs:  # zero the scales outside the span (an unwritten one may be NaN)
      p_RxT = p_RxT * jnp.where(in_span_T[None, :], scale_refs[1][ids_P].reshape(1, t), 0.0)
    else:  # zero value rows outside the span: an unwritten tail may hold NaN (0 * NaN = NaN)
      v_TxH = jnp.where(in_span_T[:, None], v_TxH, jnp.zeros_like(v_TxH))
    pv_RxH = reference.dot_f32(p_RxT.astype(v_TxH.dtype), v_TxH, contract_b=0)
    return alpha_R[:, None] * o_RxH + pv_RxH, m_next_R, l_next_R

  num_iter = pl.cdiv(jnp.maximum(end - first, 0), pages_per_block)
  init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  o_RxH, _, l_R = jax.lax.fori_loop(0, num_iter, body, init)
  safe_R = jnp.where(l_R > 0, l_R, 1.0)
  o_ref[...] = jnp.where(l_R[:, None] > 0, o_RxH / safe_R[:, None], 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "sliding_window", "pages_per_block", "queries_per_block", "num_warps",
    "num_stages", "interpret"))
def _ragged_paged_attention_gpu(q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_SxM,
                                kv_lens_S, cu_q_lens_S1, k_scales_KxPxS, v_scales_KxPxS, *,
                                scale: float, soft_cap: float | None,
                                sliding_window: int | None, pages_per_block: int,
                                queries_per_block: int, num_warps: int, num_stages: int,
                                interpret: bool) -> jax.Array:
  """Work items, query tiles, the pallas_call and the scatter back; inputs already validated."""
  t, n, h = q_TxNxH.shape
  kv_heads, num_pages, page_size, _ = k_pages_KxPxSxH.shape
  m = page_tables_SxM.shape[1]
  bq = queries_per_block
  # Triton blocks are powers of two: pad the group, and the table to whole blocks of pages.
  gp = next_pow2(n // kv_heads)
  items = schedule.work_items(cu_q_lens_S1, kv_lens_S, t, bq, sliding_window)
  q_WxKxRxH = schedule.gather_query_blocks(q_TxNxH, items, bq, kv_heads, gp)
  w, rows = q_WxKxRxH.shape[0], gp * bq
  mp = next_pow2(pl.cdiv(m, pages_per_block)) * pages_per_block
  tables_WxMp = jnp.pad(page_tables_SxM, ((0, 0), (0, mp - m)), constant_values=-1)[items.seq_W]
  span_Wx4 = jnp.stack([items.lo_W, items.hi_W, items.first_position_W, items.rows_W], axis=1)
  kernel = functools.partial(_kernel, pages_per_block=pages_per_block, queries_per_block=bq,
                             scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
  pool_spec = pl.BlockSpec((None, num_pages, page_size, h), lambda w, k: (k, 0, 0, 0))
  scale_args, scale_specs = [], []
  if k_scales_KxPxS is not None:
    scale_args = [k_scales_KxPxS, v_scales_KxPxS]
    scale_specs = 2 * [pl.BlockSpec((None, num_pages, page_size), lambda w, k: (k, 0, 0))]
  compiler_params = None
  if pl_triton is not None and not interpret:
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  qo_spec = pl.BlockSpec((None, None, rows, h), lambda w, k: (w, k, 0, 0))
  out_WxKxRxH = pl.pallas_call(
      kernel,
      grid=(w, kv_heads),
      in_specs=[pl.BlockSpec((None, mp), lambda w, k: (w, 0)),
                pl.BlockSpec((None, SPAN_FIELDS), lambda w, k: (w, 0)),
                qo_spec, pool_spec, pool_spec, *scale_specs],
      out_specs=qo_spec,
      out_shape=jax.ShapeDtypeStruct(q_WxKxRxH.shape, q_TxNxH.dtype),
      compiler_params=compiler_params,
      interpret=interpret,
  )(tables_WxMp, span_Wx4, q_WxKxRxH, k_pages_KxPxSxH, v_pages_KxPxSxH, *scale_args)
  return schedule.scatter_query_blocks(out_WxKxRxH, items, bq, t, n)


def ragged_paged_attention_gpu(q_TxNxH: jax.Array, k_pages_KxPxSxH: jax.Array,
                               v_pages_KxPxSxH: jax.Array, page_tables_SxM: jax.Array,
                               kv_lens_S: jax.Array, cu_q_lens_S1: jax.Array, *,
                               k_scales: jax.Array | None = None,
                               v_scales: jax.Array | None = None, scale: float | None = None,
                               soft_cap: float | None = None, sliding_window: int | None = None,
                               pages_per_block: int | None = None, queries_per_block: int = 16,
                               num_warps: int = 4, num_stages: int = 2,
                               interpret: bool = False) -> jax.Array:
  """Ragged paged attention on GPU; same contract as `ref_ragged_paged_attention`, [T, N, H].

  pages_per_block: pages gathered per inner step (default: enough for 16 tokens, tl.dot's
  minimum). queries_per_block: queries of one sequence per program, a power of two with
  G' * BQ >= 16. num_warps / num_stages: Triton launch parameters. interpret=True runs anywhere
  (CPU) and skips the GPU tiling checks.
  """
  dims = validation.check_inputs(q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_SxM,
                                 kv_lens_S, cu_q_lens_S1, k_scales=k_scales, v_scales=v_scales,
                                 soft_cap=soft_cap, sliding_window=sliding_window)
  if pages_per_block is None:
    pages_per_block = next_pow2(max(1, math.ceil(16 / dims.s)))
  paged_validation.check_tuning(pages_per_block)
  validation.check_queries_per_block(queries_per_block)
  if not interpret:
    paged_validation.check_gpu_tiling(dims, pages_per_block, num_splits=1)
    if next_pow2(dims.g) * queries_per_block < 16:
      raise ValueError(
          f"GPU: the query tile has {next_pow2(dims.g)} heads x {queries_per_block} queries "
          f"< 16 rows (tl.dot's minimum); raise queries_per_block to "
          f"{16 // next_pow2(dims.g)}.")
  return _ragged_paged_attention_gpu(
      q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_SxM, kv_lens_S, cu_q_lens_S1,
      k_scales, v_scales, scale=float(dims.h ** -0.5 if scale is None else scale),
      soft_cap=soft_cap, sliding_window=sliding_window, pages_per_block=pages_per_block,
      queries_per_block=queries_per_block, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret)
