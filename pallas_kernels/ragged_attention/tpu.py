"""TPU ragged paged attention: packed prefill chunks and decode tokens in one kernel.

Grid (W work items, K KV heads, page blocks). A work item is a block of BQ queries of one
sequence (`schedule.work_items`); its G * BQ query rows (the KV head's G query heads times the
BQ queries) form one [G * BQ, H] tile, so each K/V page is read once per block of queries, not
once per query. The page tables and each item's span of visible positions are scalar-prefetched
into SMEM and read by the K/V index_maps, so the pipeline DMAs exactly the pages the item sees:
blocks past its last query or before its sliding window are clamped to the nearest visible page
(the pipeline sees the same block index and does not fetch again) and skipped with pl.when.
Online softmax keeps the running max / sum / output in VMEM scratch across the page axis.

Within a tile the mask is per row: row r of query q = r % BQ sits at first_position + q and
sees keys at positions <= its own (and inside its window). Rows with nothing visible yet carry
max -inf; the update uses a finite stand-in for them so no NaN appears (FlashAttention's
treatment of fully masked rows).

int8 pages: as in the decode kernel, the tiles are cast (not scaled) to q's dtype and the
[1, S_page] scale rows multiply the logits and the probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention import validation as paged_validation
from pallas_kernels.paged_attention.tpu import load_block, write_normalized
from pallas_kernels.ragged_attention import schedule
from pallas_kernels.ragged_attention import validation

NUM_PREFETCH = 6  # seq, lo, hi, first position, rows (per work item) and the flat page tables


def _kv_index_map(j: int, *, pages_per_block: int, page_size: int, max_pages: int,
                  num_pages: int):
  """index_map of page j of a block: the physical page to fetch, clamped to visible pages."""

  def index_map(w, h, i, seq_ref, lo_ref, hi_ref, first_ref, rows_ref, tables_ref):
    del first_ref, rows_ref
    lo, hi = lo_ref[w], hi_ref[w]
    last = jnp.maximum(hi - 1, 0) // page_size
    logical = jnp.clip(i * pages_per_block + j, jnp.minimum(lo // page_size, last), last)
    page = jnp.clip(tables_ref[seq_ref[w] * max_pages + logical], 0, num_pages - 1)
    return h, page, 0, 0

  return index_map


def _kernel(seq_ref, lo_ref, hi_ref, first_ref, rows_ref, tables_ref, q_ref, *refs,
            pages_per_block: int, page_size: int, queries_per_block: int, scale: float,
            soft_cap: float | None, sliding_window: int | None, quantized: bool):
  """One (work item, KV head, page block) step of online softmax over a [ppb * S_page, H] tile."""
  del seq_ref, tables_ref
  ppb = pages_per_block
  k_refs, v_refs = refs[:ppb], refs[ppb:2 * ppb]
  ks_refs, vs_refs = (refs[2 * ppb:3 * ppb], refs[3 * ppb:4 * ppb]) if quantized else ((), ())
  o_ref, m_ref, l_ref, acc_ref = refs[(4 if quantized else 2) * ppb:]
  w, i = pl.program_id(0), pl.program_id(2)
  lo, hi = lo_ref[w], hi_ref[w]
  t = ppb * page_size
  start = i * t

  @pl.when(i == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((start < hi) & (start + t > lo))
  def _compute():
    q_RxH = q_ref[...]
    rows = q_RxH.shape[0]
    k_TxH, v_TxH = load_block(k_refs), load_block(v_refs)
    if quantized:
      k_TxH, v_TxH = k_TxH.astype(q_RxH.dtype), v_TxH.astype(q_RxH.dtype)
    s_RxT = reference.dot_f32(q_RxH, k_TxH, contract_b=1) * scale
    if quantized:
      s_RxT = s_RxT * load_block(ks_refs, axis=1)
    s_RxT = reference.apply_soft_cap(s_RxT, soft_cap)
    query_Rx1 = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) & (queries_per_block - 1)
    # Unused query slots sit at position -1, where no key is visible: the mask is built from
    # integer compares of a (1, T) row against an (R, 1) column only.
    q_pos_Rx1 = jnp.where(query_Rx1 < rows_ref[w], first_ref[w] + query_Rx1, -1)
    k_pos_1xT = start + jax.lax.broadcasted_iota(jnp.int32, (1, t), 1)
    visible_RxT = k_pos_1xT <= q_pos_Rx1
    if sliding_window is not None:
      visible_RxT &= k_pos_1xT > q_pos_Rx1 - sliding_window
    s_RxT = jnp.where(visible_RxT, s_RxT, -jnp.inf)
    m_prev_Rx1 = m_ref[...]
    m_next_Rx1 = jnp.maximum(m_prev_Rx1, jnp.max(s_RxT, axis=1, keepdims=True))
    # Rows that see nothing yet keep max -inf; subtract 0 for them (their p and alpha are 0).
    m_safe_Rx1 = jnp.where(m_next_Rx1 == -jnp.inf, 0.0, m_next_Rx1)
    alpha_Rx1 = jnp.exp(m_prev_Rx1 - m_safe_Rx1)
    p_RxT = jnp.exp(s_RxT - m_safe_Rx1)
    l_ref[...] = alpha_Rx1 * l_ref[...] + jnp.sum(p_RxT, axis=1, keepdims=True)
    m_ref[...] = m_next_Rx1
    in_span_1xT = (k_pos_1xT >= lo) & (k_pos_1xT < hi)
    if quantized:
      # int8 codes are finite; zero the scales outside the span (an unwritten one may be NaN).
      p_RxT = p_RxT * jnp.where(in_span_1xT, load_block(vs_refs, axis=1), 0.0)
    else:
      # Zero value rows outside the span: a page's unwritten tail may hold NaN (0 * NaN = NaN).
      pos_Tx1 = start + jax.lax.broadcasted_iota(jnp.int32, (t, 1), 0)
      v_TxH = jnp.where((pos_Tx1 >= lo) & (pos_Tx1 < hi), v_TxH, jnp.zeros_like(v_TxH))
    pv_RxH = reference.dot_f32(p_RxT.astype(v_TxH.dtype), v_TxH, contract_b=0)
    acc_ref[...] = alpha_Rx1 * acc_ref[...] + pv_RxH

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    write_normalized(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "sliding_window",
                                             "pages_per_block", "queries_per_block",
                                             "interpret"))
def _ragged_paged_attention_tpu(q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_SxM,
                                kv_lens_S, cu_q_lens_S1, k_scales_KxPxS, v_scales_KxPxS, *,
                                scale: float, soft_cap: float | None,
                                sliding_window: int | None, pages_per_block: int,
                                queries_per_block: int,
                                interpret: bool | pltpu.InterpretParams) -> jax.Array:
  """Work items, query tiles, the pallas_call and the scatter back; inputs already validated."""
  t, n, h = q_TxNxH.shape
  kv_heads, num_pages, page_size, _ = k_pages_KxPxSxH.shape
  m = page_tables_SxM.shape[1]
  g, bq = n // kv_heads, queries_per_block
  ppb = min(pages_per_block, m)
  items = schedule.work_items(cu_q_lens_S1, kv_lens_S, t, bq, sliding_window)
  q_WxKxRxH = schedule.gather_query_blocks(q_TxNxH, items, bq, kv_heads, g)
  w, rows = q_WxKxRxH.shape[0], g * bq
  index_maps = [_kv_index_map(j, pages_per_block=ppb, page_size=page_size, max_pages=m,
                              num_pages=num_pages) for j in range(ppb)]
  kv_specs = [pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), page_size, h), index_map)
              for index_map in index_maps]
  quantized = k_scales_KxPxS is not None
  scale_args, scale_specs = [], []
  if quantized:  # [K, P, 1, S_page] views: see the decode kernel (pallas_kernels.paged_attention)
    as_rows = lambda x: x.reshape(kv_heads, num_pages, 1, page_size)
    scale_args = [as_rows(k_scales_KxPxS)] * ppb + [as_rows(v_scales_KxPxS)] * ppb
    scale_specs = 2 * [pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), 1, page_size), index_map)
                       for index_map in index_maps]
  qo_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), rows, h),
                         lambda w, h, i, *_: (w, h, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=NUM_PREFETCH,
      grid=(w, kv_heads, pl.cdiv(m, ppb)),
      in_specs=[qo_spec, *kv_specs, *kv_specs, *scale_specs],
      out_specs=qo_spec,
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, h), jnp.float32)])
  kernel = functools.partial(_kernel, pages_per_block=ppb, page_size=page_size,
                             queries_per_block=bq, scale=scale, soft_cap=soft_cap,
                             sliding_window=sliding_window, quantized=quantized)
  out_WxKxRxH = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q_WxKxRxH.shape, q_TxNxH.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(items.seq_W, items.lo_W, items.hi_W, items.first_position_W, items.rows_W,
    page_tables_SxM.reshape(-1),  # 1-D: 2-D SMEM pads rows
    q_WxKxRxH, *[k_pages_KxPxSxH] * ppb, *[v_pages_KxPxSxH] * ppb, *scale_args)
  return schedule.scatter_query_blocks(out_WxKxRxH, items, bq, t, n)


def ragged_paged_attention_tpu(q_TxNxH: jax.Array, k_pages_KxPxSxH: jax.Array,
                               v_pages_KxPxSxH: jax.Array, page_tables_SxM: jax.Array,
                               kv_lens_S: jax.Array, cu_q_lens_S1: jax.Array, *,
                               k_scales: jax.Array | None = None,
                               v_scales: jax.Array | None = None, scale: float | None = None,
                               soft_cap: float | None = None, sliding_window: int | None = None,
                               pages_per_block: int = 1, queries_per_block: int = 16,
                               interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
  """Ragged paged attention on TPU; same contract as `ref_ragged_paged_attention`, [T, N, H].

  pages_per_block: pages per grid step. queries_per_block: queries of one sequence per work
  item, a power of two (a multiple of 8 keeps the [G * BQ, H] tile whole sublanes; a decode
  token still takes a whole block). interpret=True runs anywhere (CPU) and skips the TPU tiling
  checks.
  """
  dims = validation.check_inputs(q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_SxM,
                                 kv_lens_S, cu_q_lens_S1, k_scales=k_scales, v_scales=v_scales,
                                 soft_cap=soft_cap, sliding_window=sliding_window)
  paged_validation.check_tuning(pages_per_block)
  validation.check_queries_per_block(queries_per_block)
  if not interpret:
    paged_validation.check_tpu_tiling(dims, k_pages_KxPxSxH.dtype)
  return _ragged_paged_attention_tpu(
      q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_SxM, kv_lens_S, cu_q_lens_S1,
      k_scales, v_scales, scale=float(dims.h ** -0.5 if scale is None else scale),
      soft_cap=soft_cap, sliding_window=sliding_window, pages_per_block=pages_per_block,
      queries_per_block=queries_per_block, interpret=interpret)
