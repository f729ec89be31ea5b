"""Input checks for ragged paged attention, before any work: shapes, dtypes, the packed layout
(when the values are concrete) and the kernels' tuning values. Dtype and tiling rules are the
decode kernel's (`pallas_kernels.paged_attention.validation`): same pages, same tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import validation as paged_validation

Dims = paged_validation.Dims  # b counts sequences here


def check_inputs(q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, *, k_scales=None,
                 v_scales=None, soft_cap: float | None = None,
                 sliding_window: int | None = None) -> Dims:
  """Checks shapes and dtypes agree and, outside jit, that the layout is consistent: cu_q_lens
  non-decreasing within [0, T], no sequence with more queries than cached tokens, and every
  kv_len within its page table's capacity. Returns the sizes (b = sequences)."""
  if q.ndim != 3:
    raise ValueError(f"q must be [T, N, H] (queries of all sequences packed); got {q.shape}.")
  t, n, h = q.shape
  k, p, s, _ = paged_validation.check_pages(n, h, k_pages, v_pages)
  if page_tables.ndim != 2 or page_tables.dtype != jnp.int32:
    raise ValueError(
        f"page_tables must be int32 [S, M] (one row per sequence); got {page_tables.dtype} "
        f"{page_tables.shape}.")
  num_seqs, m = page_tables.shape
  if num_seqs < 1:
    raise ValueError("page_tables must have at least one sequence row.")
  if kv_lens.shape != (num_seqs,) or not jnp.issubdtype(kv_lens.dtype, jnp.integer):
    raise ValueError(
        f"kv_lens must be an integer array of shape [S={num_seqs}]; got {kv_lens.dtype} "
        f"{kv_lens.shape}.")
  if cu_q_lens.shape != (num_seqs + 1,) or not jnp.issubdtype(cu_q_lens.dtype, jnp.integer):
    raise ValueError(
        f"cu_q_lens must be an integer array of shape [S + 1 = {num_seqs + 1}] (sequence s owns "
        f"q rows cu_q_lens[s]:cu_q_lens[s + 1]); got {cu_q_lens.dtype} {cu_q_lens.shape}.")
  paged_validation.check_dtypes(q, k_pages, v_pages, k_scales, v_scales)
  paged_validation.check_options(soft_cap, sliding_window)
  if not isinstance(cu_q_lens, jax.core.Tracer) and not isinstance(kv_lens, jax.core.Tracer):
    _check_layout(np.asarray(cu_q_lens), np.asarray(kv_lens), t, m * s)
  return Dims(b=num_seqs, n=n, h=h, k=k, p=p, s=s, m=m)


def _check_layout(cu: np.ndarray, kv_lens: np.ndarray, num_tokens: int, capacity: int) -> None:
  q_lens = np.diff(cu)
  if cu[0] < 0 or cu[-1] > num_tokens or (q_lens < 0).any():
    raise ValueError(
        f"cu_q_lens must be non-decreasing within [0, T={num_tokens}]; got {cu.tolist()}.")
  if kv_lens.min() < 0 or kv_lens.max() > capacity:
    raise ValueError(
        f"kv_lens must lie in [0, M * S_page] = [0, {capacity}]; got min {kv_lens.min()}, max "
        f"{kv_lens.max()}. Grow page_tables or trim kv_lens.")
  short = np.flatnonzero(q_lens > kv_lens)
  if short.size:
    s = int(short[0])
    raise ValueError(
        f"sequence {s} has {q_lens[s]} queries but kv_lens[{s}] = {kv_lens[s]}: its queries are "
        f"its newest cached tokens, so write their K/V first (kv_lens >= queries).")


def check_queries_per_block(queries_per_block: int) -> None:
  """Blocks of queries are a power of two (a row's query index is row & (BQ - 1))."""
  if queries_per_block < 1 or queries_per_block & (queries_per_block - 1):
    raise ValueError(
        f"queries_per_block must be a power of two (1, 2, 4, ...); got {queries_per_block}.")
