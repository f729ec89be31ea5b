"""TPU decode paged attention: one query token per row, K/V read in place from the page pool.

Grid (B, K, page blocks). The page table and lengths are scalar-prefetched into SMEM and read
by the K/V index_maps, so the pipeline DMAs exactly the pages a row uses: a block index past
the row's last visible page (or before its sliding window) is clamped to the nearest visible
page, which the pipeline sees as "same block as before" and does not fetch again; compute for
such blocks is skipped with pl.when. The G query heads of one KV head form one [G, H] tile, so
each K/V page is read once per group. Online softmax keeps the running max / sum / output in
VMEM scratch across the page axis ("arbitrary"); batch and KV head are "parallel" (megacore).

pages_per_block > 1 passes the pool that many times with one BlockSpec per page (pages of a
row are not contiguous, so one BlockSpec cannot cover several), giving a [ppb * S_page, H] tile
per step.

int8 pages: the tiles are cast (not scaled) to q's dtype for the MXU, and each page's scales
arrive as a [1, S_page] row (a [K, P, 1, S_page] view of the scale pool, so the block's last two
dims equal the array's, as Mosaic requires) that multiplies the [G, T] logits and probabilities
along T: scores = (q . k_q) * s_k[t], out = sum_t (p_t * s_v[t]) * v_q[t].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention import validation


def _page_span(length, lo, page_size: int):
  """Logical pages [first, last] holding the visible positions [lo, length) (0, 0 if empty)."""
  last = jnp.maximum(length - 1, 0) // page_size
  return jnp.minimum(lo // page_size, last), last


def _kv_index_map(j: int, *, pages_per_block: int, page_size: int, max_pages: int,
                  num_pages: int, sliding_window: int | None):
  """index_map of page j of a block: the physical page to fetch, clamped to visible pages."""

  def index_map(b, h, i, lengths_ref, tables_ref):
    length = lengths_ref[b]
    lo, _ = reference.visible_span(length, sliding_window)
    first, last = _page_span(length, lo, page_size)
    logical = jnp.clip(i * pages_per_block + j, first, last)
    # NO_PAGE (-1) only appears for empty rows here; clip keeps the DMA in bounds.
    page = jnp.clip(tables_ref[b * max_pages + logical], 0, num_pages - 1)
    return h, page, 0, 0

  return index_map


def load_block(page_refs, axis: int = 0) -> jax.Array:
  """The [ppb * S_page, H] tile of a block's pages (or [1, ppb * S_page] scale row), in order."""
  if len(page_refs) == 1:
    return page_refs[0][...]
  return jnp.concatenate([r[...] for r in page_refs], axis=axis)


def write_normalized(o_ref, l_ref, acc_ref) -> None:
  """The online softmax's last step: out = acc / sum per row, zeros for rows that saw nothing."""
  l_Rx1 = l_ref[...]
  safe_Rx1 = jnp.where(l_Rx1 > 0, l_Rx1, 1.0)
  o_ref[...] = jnp.where(l_Rx1 > 0, acc_ref[...] / safe_Rx1, 0.0).astype(o_ref.dtype)


def _kernel(lengths_ref, tables_ref, q_ref, *refs, pages_per_block: int, page_size: int,
            scale: float, soft_cap: float | None, sliding_window: int | None, quantized: bool):
  """One (row, KV head, page block) step of online softmax over a [ppb * S_page, H] tile."""
  ppb = pages_per_block
  k_refs, v_refs = refs[:ppb], refs[ppb:2 * ppb]
  ks_refs, vs_refs = (refs[2 * ppb:3 * ppb], refs[3 * ppb:4 * ppb]) if quantized else ((), ())
  o_ref, m_ref, l_ref, acc_ref = refs[(4 if quantized else 2) * ppb:]
  b, i = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[b]
  lo, _ = reference.visible_span(length, sliding_window)
  t = pages_per_block * page_size
  start = i * t

  @pl.when(i == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((start < length) & (start + t > lo))
  def _compute():
    q_GxH = q_ref[...]
    k_TxH, v_TxH = load_block(k_refs), load_block(v_refs)
    if quantized:  # int8 -> q's dtype is exact; the scales go on the logits and probabilities
      k_TxH, v_TxH = k_TxH.astype(q_GxH.dtype), v_TxH.astype(q_GxH.dtype)
    s_GxT = reference.dot_f32(q_GxH, k_TxH, contract_b=1) * scale
    if quantized:
      s_GxT = s_GxT * load_block(ks_refs, axis=1)
    s_GxT = reference.apply_soft_cap(s_GxT, soft_cap)
    pos_1xT = start + jax.lax.broadcasted_iota(jnp.int32, (1, t), 1)
    visible_1xT = (pos_1xT >= lo) & (pos_1xT < length)
    s_GxT = jnp.where(visible_1xT, s_GxT, -jnp.inf)
    # This block holds a visible position, so m_next is finite and alpha/p are well defined.
    m_prev_Gx1 = m_ref[...]
    m_next_Gx1 = jnp.maximum(m_prev_Gx1, jnp.max(s_GxT, axis=1, keepdims=True))
    alpha_Gx1 = jnp.exp(m_prev_Gx1 - m_next_Gx1)
    p_GxT = jnp.exp(s_GxT - m_next_Gx1)
    l_ref[...] = alpha_Gx1 * l_ref[...] + jnp.sum(p_GxT, axis=1, keepdims=True)
    m_ref[...] = m_next_Gx1
    if quantized:
      # int8 codes are finite; zero the invisible scales instead (an unwritten one may be NaN).
      v_scale_1xT = jnp.where(visible_1xT, load_block(vs_refs, axis=1), 0.0)
      p_GxT = p_GxT * v_scale_1xT
    else:
      # Zero invisible value rows: a page's unwritten tail may hold NaN, and 0 * NaN = NaN.
      pos_Tx1 = start + jax.lax.broadcasted_iota(jnp.int32, (t, 1), 0)
      v_TxH = jnp.where((pos_Tx1 >= lo) & (pos_Tx1 < length), v_TxH, jnp.zeros_like(v_TxH))
    pv_GxH = reference.dot_f32(p_GxT.astype(v_TxH.dtype), v_TxH, contract_b=0)
    acc_ref[...] = alpha_Gx1 * acc_ref[...] + pv_GxH

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    write_normalized(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "sliding_window",
                                             "pages_per_block", "interpret"))
def _paged_attention_tpu(q_BxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_BxM, lengths_B,
                         k_scales_KxPxS, v_scales_KxPxS, *, scale: float,
                         soft_cap: float | None, sliding_window: int | None,
                         pages_per_block: int,
                         interpret: bool | pltpu.InterpretParams) -> jax.Array:
  """The pallas_call; inputs already validated. Scales are None (float pages) or both given."""
  b, n, h = q_BxNxH.shape
  kv_heads, num_pages, page_size, _ = k_pages_KxPxSxH.shape
  m = page_tables_BxM.shape[1]
  g = n // kv_heads
  ppb = min(pages_per_block, m)
  q_BxKxGxH = q_BxNxH.reshape(b, kv_heads, g, h)
  index_maps = [_kv_index_map(j, pages_per_block=ppb, page_size=page_size, max_pages=m,
                              num_pages=num_pages, sliding_window=sliding_window)
                for j in range(ppb)]
  kv_specs = [pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), page_size, h), index_map)
              for index_map in index_maps]
  quantized = k_scales_KxPxS is not None
  scale_args, scale_specs = [], []
  if quantized:
    # [K, P, 1, S_page]: a page's scales are one [1, S_page] block equal to the array's last
    # two dims (Mosaic's rule), laid along T like the logits they scale.
    as_rows = lambda x: x.reshape(kv_heads, num_pages, 1, page_size)
    scale_args = [as_rows(k_scales_KxPxS)] * ppb + [as_rows(v_scales_KxPxS)] * ppb
    scale_specs = 2 * [pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), 1, page_size), index_map)
                       for index_map in index_maps]
  qo_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), g, h), lambda b, h, i, *_: (b, h, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kv_heads, pl.cdiv(m, ppb)),
      in_specs=[qo_spec, *kv_specs, *kv_specs, *scale_specs],
      out_specs=qo_spec,
      scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                      pltpu.VMEM((g, h), jnp.float32)])
  kernel = functools.partial(_kernel, pages_per_block=ppb, page_size=page_size, scale=scale,
                             soft_cap=soft_cap, sliding_window=sliding_window,
                             quantized=quantized)
  out_BxKxGxH = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q_BxKxGxH.shape, q_BxNxH.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(lengths_B.astype(jnp.int32), page_tables_BxM.reshape(-1),  # 1-D: 2-D SMEM pads rows
    q_BxKxGxH, *[k_pages_KxPxSxH] * ppb, *[v_pages_KxPxSxH] * ppb, *scale_args)
  return out_BxKxGxH.reshape(b, n, h)


def paged_attention_tpu(q_BxNxH: jax.Array, k_pages_KxPxSxH: jax.Array,
                        v_pages_KxPxSxH: jax.Array, page_tables_BxM: jax.Array,
                        lengths_B: jax.Array, *, k_scales: jax.Array | None = None,
                        v_scales: jax.Array | None = None, scale: float | None = None,
                        soft_cap: float | None = None, sliding_window: int | None = None,
                        pages_per_block: int = 1,
                        interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
  """Decode paged attention on TPU; same contract as `ref_paged_attention`, returns [B, N, H].

  k_scales / v_scales: float32 [K, P, S_page] scales of int8 pages (both or neither).
  pages_per_block: pages per grid step (larger tiles, fewer steps; >= 2 pages of 8-16 tokens
  keep the MXU busier). interpret=True runs anywhere (CPU) and skips the TPU tiling checks;
  interpret=pltpu.InterpretParams() also simulates TPU memory spaces and DMAs (slower).
  """
  dims = validation.check_inputs(q_BxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_BxM,
                                 lengths_B, k_scales=k_scales, v_scales=v_scales,
                                 soft_cap=soft_cap, sliding_window=sliding_window)
  validation.check_tuning(pages_per_block)
  if not interpret:
    validation.check_tpu_tiling(dims, k_pages_KxPxSxH.dtype)
  return _paged_attention_tpu(
      q_BxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_BxM, lengths_B, k_scales, v_scales,
      scale=float(dims.h ** -0.5 if scale is None else scale), soft_cap=soft_cap,
      sliding_window=sliding_window, pages_per_block=pages_per_block, interpret=interpret)
