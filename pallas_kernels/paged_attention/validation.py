"""Input checks for paged attention: shape/dtype consistency and per-backend tiling rules.

Interpret mode accepts any shapes; compiled kernels do not, and a bad tile shows up as a
cryptic Mosaic/Triton error (or silently wrong numbers), so the rules are checked here with a
message naming the dimension and the fix.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Dims(NamedTuple):
  """The sizes every paged-attention path needs."""
  b: int  # batch rows
  n: int  # query heads
  h: int  # head dim
  k: int  # KV heads
  p: int  # pages in the pool
  s: int  # tokens per page
  m: int  # page-table entries per row

  @property
  def g(self) -> int:
    """Query heads per KV head."""
    return self.n // self.k


def _is_pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


def check_inputs(q, k_pages, v_pages, page_tables, lengths, *, k_scales=None, v_scales=None,
                 soft_cap: float | None = None, sliding_window: int | None = None) -> Dims:
  """Checks shapes and dtypes agree; returns the dimension sizes.

  Lengths are also checked against the page-table capacity when they are concrete (outside jit).
  With k_scales / v_scales the pages must be int8 and the scales float32 [K, P, S_page].
  """
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H] (one decode token per row); got shape {q.shape}.")
  b, n, h = q.shape
  k, p, s, _ = check_pages(n, h, k_pages, v_pages)
  if page_tables.ndim != 2 or page_tables.shape[0] != b:
    raise ValueError(f"page_tables must be [B={b}, M]; got shape {page_tables.shape}.")
  if page_tables.dtype != jnp.int32:
    raise ValueError(
        f"page_tables must be int32, got {page_tables.dtype}; use "
        f"jnp.asarray(page_tables, jnp.int32).")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
        f"lengths must be an integer array of shape [B={b}]; got {lengths.dtype} {lengths.shape}.")
  check_dtypes(q, k_pages, v_pages, k_scales, v_scales)
  check_options(soft_cap, sliding_window)
  m = page_tables.shape[1]
  if not isinstance(lengths, jax.core.Tracer):
    lengths_np = np.asarray(lengths)
    if lengths_np.size and (lengths_np.min() < 0 or lengths_np.max() > m * s):
      raise ValueError(
          f"lengths must lie in [0, M * S_page] = [0, {m * s}] (M={m} pages of S_page={s}); "
          f"got min {lengths_np.min()}, max {lengths_np.max()}. Grow page_tables or trim lengths.")
  return Dims(b=b, n=n, h=h, k=k, p=p, s=s, m=m)


def check_pages(n: int, h: int, k_pages, v_pages) -> tuple[int, int, int, int]:
  """K/V pools of one [K, P, S_page, H] shape, H = the queries' head dim, K dividing the N query
  heads; returns (K, P, S_page, H)."""
  if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
    raise ValueError(
        f"k_pages and v_pages must both be [K, P, S_page, H] of the same shape; got "
        f"{k_pages.shape} and {v_pages.shape}.")
  k, p, s, hk = k_pages.shape
  if hk != h:
    raise ValueError(f"head dim H of q ({h}) and of k_pages/v_pages ({hk}) must match.")
  if n % k:
    raise ValueError(
        f"query heads N={n} must be a multiple of KV heads K={k} (grouped-query attention).")
  return k, p, s, hk


def check_options(soft_cap: float | None, sliding_window: int | None) -> None:
  """A positive soft cap and a window of at least one position, or None."""
  if soft_cap is not None and not soft_cap > 0:
    raise ValueError(f"soft_cap must be positive or None; got {soft_cap}.")
  if sliding_window is not None and not sliding_window >= 1:
    raise ValueError(f"sliding_window must be at least 1 or None; got {sliding_window}.")


def check_dtypes(q, k_pages, v_pages, k_scales, v_scales) -> None:
  """Float pages share q's dtype; int8 pages come with float32 [K, P, S_page] scales."""
  if (k_scales is None) != (v_scales is None):
    raise ValueError("k_scales and v_scales must be given together (int8 K and V pages).")
  if k_scales is None:
    if k_pages.dtype == jnp.int8 or v_pages.dtype == jnp.int8:
      raise ValueError(
          f"int8 k_pages/v_pages need k_scales and v_scales (float32 [K, P, S_page] = "
          f"{k_pages.shape[:3]}); pass the int8 cache's scales.")
    if not jnp.issubdtype(q.dtype, jnp.floating) or q.dtype != k_pages.dtype or (
        k_pages.dtype != v_pages.dtype):
      raise ValueError(
          f"q, k_pages and v_pages must share one floating dtype; got {q.dtype}, "
          f"{k_pages.dtype}, {v_pages.dtype}. Cast q to the cache dtype.")
    return
  if k_pages.dtype != jnp.int8 or v_pages.dtype != jnp.int8:
    raise ValueError(
        f"with k_scales/v_scales, k_pages and v_pages must be int8; got {k_pages.dtype} and "
        f"{v_pages.dtype}. Drop the scales for a float cache.")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be floating (float32 or bfloat16) for int8 pages; got {q.dtype}.")
  for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
    if scales.shape != k_pages.shape[:3] or scales.dtype != jnp.float32:
      raise ValueError(
          f"{name} must be float32 [K, P, S_page] = {k_pages.shape[:3]} (one scale per page "
          f"slot and KV head); got {scales.dtype} {scales.shape}.")


def check_tpu_tiling(dims: Dims, dtype) -> None:
  """Mosaic TPU rules for the compiled kernel: a K/V block is an [S_page, H] VMEM tile.

  Its last two dims map onto (sublanes, lanes): S_page a multiple of 8 rows per 32 bits
  (16 for bfloat16, 32 for 8-bit) and H a multiple of 128 lanes. We do not pad H inside the
  kernel: padding would copy the whole page pool every call; pad the cache once instead.
  """
  rows = 8 * (4 // jnp.dtype(dtype).itemsize)
  if dims.s % rows:
    raise ValueError(
        f"TPU: page size S_page={dims.s} must be a multiple of {rows} for {jnp.dtype(dtype).name} "
        f"(sublane tiling); allocate the cache with page_size a multiple of {rows}.")
  if dims.h % 128:
    raise ValueError(
        f"TPU: head dim H={dims.h} must be a multiple of 128 (lane tiling); pad the head dim of "
        f"q, k_pages and v_pages with zeros to {-(-dims.h // 128) * 128} (scores are unchanged; "
        f"pass scale={dims.h ** -0.5:.6g} and drop the padded output lanes), or use "
        f"interpret=True.")


def check_gpu_tiling(dims: Dims, pages_per_block: int, num_splits: int) -> None:
  """Triton rules for the compiled kernel: power-of-two blocks, tl.dot dims of at least 16."""
  if not _is_pow2(dims.h) or dims.h < 16:
    raise ValueError(
        f"GPU: head dim H={dims.h} must be a power of two >= 16 (Triton block shapes and tl.dot); "
        f"pad the head dim to {max(16, 1 << (dims.h - 1).bit_length())}.")
  tokens = dims.s * pages_per_block
  if not _is_pow2(dims.s) or not _is_pow2(pages_per_block) or tokens < 16:
    raise ValueError(
        f"GPU: page size S_page={dims.s} and pages_per_block={pages_per_block} must be powers "
        f"of two with S_page * pages_per_block >= 16 (Triton tl.dot); got {tokens} tokens per "
        f"block. Raise pages_per_block to {max(1, 16 // max(dims.s, 1))} or use a power-of-two "
        f"page size.")
  if not _is_pow2(num_splits):
    raise ValueError(f"GPU: num_splits={num_splits} must be a power of two (1, 2, 4, ...).")


def check_tuning(pages_per_block: int) -> None:
  """Tuning values valid on every backend."""
  if pages_per_block < 1:
    raise ValueError(f"pages_per_block must be at least 1; got {pages_per_block}.")
