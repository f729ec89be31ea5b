"""GPU decode paged attention, split-K ("flash-decoding"), Triton-style Pallas.

Grid (B, K, num_splits). Each program takes one row's [G, H] query group of one KV head and a
contiguous span of that row's page table, loops over its visible pages `pages_per_block` at a
time (gathering the pages from the pool by id), and writes an unnormalised partial output with
its running max and sum. A small XLA combine rescales and merges the splits. Splits let short
batches fill the GPU's SMs when B * K alone is too few programs.

Only visible pages are read: the loop bounds stop at the row's last page (and start at its
sliding window), and page slots of a block outside that span are redirected to the block's
first visible page, which is already being read.

int8 pages: the gathered tiles are cast (not scaled) to q's dtype for tl.dot, and the block's
[1, T] row of per-token scales multiplies the logits and the probabilities:
scores = (q . k_q) * s_k[t], out = sum_t (p_t * s_v[t]) * v_q[t].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention import validation

try:  # The Triton lowering's params (deprecated since jax 0.11; Mosaic GPU is the default).
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
  pl_triton = None


def next_pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << max(x - 1, 0).bit_length()


def _kernel(tables_ref, lengths_ref, q_ref, k_pages_ref, v_pages_ref, *refs,
            pages_per_block: int, pages_per_split: int, scale: float, soft_cap: float | None,
            sliding_window: int | None):
  """Online softmax over this program's span of pages -> partial (out, max, sum).

  refs: (k_scales, v_scales,) for int8 pages, then the outputs (out, max, sum).
  """
  scale_refs, (o_ref, m_ref, l_ref) = refs[:-3], refs[-3:]
  split = pl.program_id(2)
  g, h = q_ref.shape
  num_pages, page_size = k_pages_ref.shape[0], k_pages_ref.shape[1]
  t = pages_per_block * page_size
  length = lengths_ref[0]
  lo, _ = reference.visible_span(length, sliding_window)
  # Visible logical pages of this split, aligned down to a block so loads stay in bounds.
  split_lo = split * pages_per_split
  first_visible = jnp.maximum(split_lo, lo // page_size)
  first = split_lo + (first_visible - split_lo) // pages_per_block * pages_per_block
  end = jnp.minimum(split_lo + pages_per_split, pl.cdiv(length, page_size))
  q_GxH = q_ref[...]

  def body(it, carry):
    o_GxH, m_G, l_G = carry
    start = first + it * pages_per_block
    ids_P = tables_ref[pl.ds(start, pages_per_block)]
    logical_P = start + jnp.arange(pages_per_block)
    # Slots before the window or past the end (NO_PAGE, stale ids) re-read the block's first
    # visible page instead, so no page outside the visible span is ever loaded.
    in_span_P = (logical_P >= first_visible) & (logical_P < end)
    ids_P = jnp.where(in_span_P, ids_P, tables_ref[pl.ds(jnp.maximum(start, first_visible), 1)])
    ids_P = jnp.clip(ids_P, 0, num_pages - 1)
    k_TxH = k_pages_ref[ids_P].reshape(t, h)
    v_TxH = v_pages_ref[ids_P].reshape(t, h)
    if scale_refs:  # int8 -> q's dtype is exact; the scales go on the logits and probabilities
      k_TxH, v_TxH = k_TxH.astype(q_GxH.dtype), v_TxH.astype(q_GxH.dtype)
    s_GxT = reference.dot_f32(q_GxH, k_TxH, contract_b=1) * scale
    if scale_refs:
      s_GxT = s_GxT * scale_refs[0][ids_P].reshape(1, t)
    s_GxT = reference.apply_soft_cap(s_GxT, soft_cap)
    pos_T = start * page_size + jnp.arange(t)
    visible_T = (pos_T >= lo) & (pos_T < length)
    s_GxT = jnp.where(visible_T[None, :], s_GxT, -jnp.inf)
    m_next_G = jnp.maximum(m_G, jnp.max(s_GxT, axis=1))  # finite: the block has a visible slot
    alpha_G = jnp.exp(m_G - m_next_G)
    p_GxT = jnp.exp(s_GxT - m_next_G[:, None])
    l_next_G = alpha_G * l_G + jnp.sum(p_GxT, axis=1)
    if scale_refs:
      # int8 codes are finite; zero the invisible scales instead (an unwritten one may be NaN).
      v_scale_1xT = jnp.where(visible_T[None, :], scale_refs[1][ids_P].reshape(1, t), 0.0)
      p_GxT = p_GxT * v_scale_1xT
    else:
      # Zero invisible value rows: a page's unwritten tail may hold NaN, and 0 * NaN = NaN.
      v_TxH = jnp.where(visible_T[:, None], v_TxH, jnp.zeros_like(v_TxH))
    pv_GxH = reference.dot_f32(p_GxT.astype(v_TxH.dtype), v_TxH, contract_b=0)
    return alpha_G[:, None] * o_GxH + pv_GxH, m_next_G, l_next_G

  num_iter = pl.cdiv(jnp.maximum(end - first, 0), pages_per_block)
  init = (jnp.zeros((g, h), jnp.float32), jnp.full((g,), -jnp.inf, jnp.float32),
          jnp.zeros((g,), jnp.float32))
  o_GxH, m_G, l_G = jax.lax.fori_loop(0, num_iter, body, init)
  o_ref[...] = o_GxH
  m_ref[...] = m_G
  l_ref[...] = l_G


def combine_splits(o_SxBxKxGxH: jax.Array, m_SxBxKxG: jax.Array,
                   l_SxBxKxG: jax.Array) -> jax.Array:
  """Merges per-split unnormalised outputs into softmax-normalised [B, K, G, H] (float32)."""
  m_BxKxG = jnp.max(m_SxBxKxG, axis=0)
  m_BxKxG = jnp.where(jnp.isfinite(m_BxKxG), m_BxKxG, 0.0)  # rows with nothing visible
  w_SxBxKxG = jnp.exp(m_SxBxKxG - m_BxKxG)  # empty splits have m = -inf -> weight 0
  num_BxKxGxH = jnp.sum(w_SxBxKxG[..., None] * o_SxBxKxGxH, axis=0)
  den_BxKxG = jnp.sum(w_SxBxKxG * l_SxBxKxG, axis=0)[..., None]
  return jnp.where(den_BxKxG > 0, num_BxKxGxH / jnp.where(den_BxKxG > 0, den_BxKxG, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "sliding_window", "pages_per_block", "num_splits", "num_warps",
    "num_stages", "interpret"))
def _paged_attention_gpu(q_BxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_BxM, lengths_B,
                         k_scales_KxPxS, v_scales_KxPxS, *, scale: float,
                         soft_cap: float | None, sliding_window: int | None,
                         pages_per_block: int, num_splits: int, num_warps: int,
                         num_stages: int, interpret: bool) -> jax.Array:
  """The pallas_call plus combine; inputs already validated. Scales are None or both given."""
  b, n, h = q_BxNxH.shape
  kv_heads, num_pages, page_size, _ = k_pages_KxPxSxH.shape
  m = page_tables_BxM.shape[1]
  g = n // kv_heads
  # Triton blocks are powers of two and tl.dot needs >= 16 rows: pad the query group with zeros.
  gp = max(16, next_pow2(g))
  q_BxKxGxH = jnp.pad(q_BxNxH.reshape(b, kv_heads, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  # Pad the page table (only the table, never the pool) to a power of two of whole splits.
  pages_per_split = next_pow2(pl.cdiv(m, num_splits * pages_per_block)) * pages_per_block
  mp = pages_per_split * num_splits
  tables_BxMp = jnp.pad(page_tables_BxM, ((0, 0), (0, mp - m)), constant_values=-1)
  kernel = functools.partial(_kernel, pages_per_block=pages_per_block,
                             pages_per_split=pages_per_split, scale=scale, soft_cap=soft_cap,
                             sliding_window=sliding_window)
  pool_spec = pl.BlockSpec((None, num_pages, page_size, h), lambda b, k, s: (k, 0, 0, 0))
  scale_args, scale_specs = [], []
  if k_scales_KxPxS is not None:  # the KV head's whole [P, S_page] scale pool, like its pages
    scale_args = [k_scales_KxPxS, v_scales_KxPxS]
    scale_specs = 2 * [pl.BlockSpec((None, num_pages, page_size), lambda b, k, s: (k, 0, 0))]
  part_shape = (num_splits, b, kv_heads, gp)
  compiler_params = None
  if pl_triton is not None and not interpret:
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  o, m_, l_ = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None, mp), lambda b, k, s: (b, 0)),
          pl.BlockSpec((1,), lambda b, k, s: (b,)),
          pl.BlockSpec((None, None, gp, h), lambda b, k, s: (b, k, 0, 0)),
          pool_spec, pool_spec, *scale_specs],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, h), lambda b, k, s: (s, b, k, 0, 0)),
          pl.BlockSpec((None, None, None, gp), lambda b, k, s: (s, b, k, 0)),
          pl.BlockSpec((None, None, None, gp), lambda b, k, s: (s, b, k, 0))],
      out_shape=[jax.ShapeDtypeStruct((*part_shape, h), jnp.float32),
                 jax.ShapeDtypeStruct(part_shape, jnp.float32),
                 jax.ShapeDtypeStruct(part_shape, jnp.float32)],
      compiler_params=compiler_params,
      interpret=interpret,
  )(tables_BxMp, lengths_B.astype(jnp.int32), q_BxKxGxH, k_pages_KxPxSxH, v_pages_KxPxSxH,
    *scale_args)
  out_BxKxGxH = combine_splits(o, m_, l_)[:, :, :g]
  return out_BxKxGxH.reshape(b, n, h).astype(q_BxNxH.dtype)


def paged_attention_gpu(q_BxNxH: jax.Array, k_pages_KxPxSxH: jax.Array,
                        v_pages_KxPxSxH: jax.Array, page_tables_BxM: jax.Array,
                        lengths_B: jax.Array, *, k_scales: jax.Array | None = None,
                        v_scales: jax.Array | None = None, scale: float | None = None,
                        soft_cap: float | None = None, sliding_window: int | None = None,
                        pages_per_block: int | None = None, num_splits: int = 4,
                        num_warps: int = 4, num_stages: int = 2,
                        interpret: bool = False) -> jax.Array:
  """Decode paged attention on GPU; same contract as `ref_paged_attention`, returns [B, N, H].

  k_scales / v_scales: float32 [K, P, S_page] scales of int8 pages (both or neither).
  pages_per_block: pages gathered per inner step (default: enough for 16 tokens, tl.dot's
  minimum). num_splits: programs per (row, KV head) splitting the page table (more when B * K
  is small next to the SM count). num_warps / num_stages: Triton launch parameters.
  interpret=True runs anywhere (CPU) and skips the GPU tiling checks.
  """
  dims = validation.check_inputs(q_BxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_BxM,
                                 lengths_B, k_scales=k_scales, v_scales=v_scales,
                                 soft_cap=soft_cap, sliding_window=sliding_window)
  if pages_per_block is None:
    pages_per_block = next_pow2(max(1, math.ceil(16 / dims.s)))
  validation.check_tuning(pages_per_block)
  if num_splits < 1:
    raise ValueError(f"num_splits must be at least 1; got {num_splits}.")
  if not interpret:
    validation.check_gpu_tiling(dims, pages_per_block, num_splits)
  return _paged_attention_gpu(
      q_BxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH, page_tables_BxM, lengths_B, k_scales, v_scales,
      scale=float(dims.h ** -0.5 if scale is None else scale), soft_cap=soft_cap,
      sliding_window=sliding_window, pages_per_block=pages_per_block, num_splits=num_splits,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
