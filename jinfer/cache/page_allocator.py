"""Host-side bookkeeping for the paged KV cache: a free list and per-page reference counts.

A sequence owns a page table: the list of page ids holding its tokens, token i in page
`table[i // page_size]` at slot `i % page_size`. Tables may share pages (a common prompt prefix,
the n samples of one prompt, beam forks): each page counts the tables holding it and returns to
the free list when the count reaches 0. A shared page is never written in place: `writable`
gives the writer a private copy first (copy-on-write), and the caller copies the page's K/V on
device with `PagedKVCache.copy_pages`. `reserve` readies a table for appending: copy-on-write of
a shared partial last page, fresh pages past it.

Everything here is plain Python on the host; no jax. Failed calls change nothing.
"""

from __future__ import annotations

import collections
from typing import Iterable, Optional, Sequence

import numpy as np

from jinfer.errors import CacheFullError, JinferError

# Page-table entry of a page slot that holds no page: writes there are dropped, reads masked.
NO_PAGE = -1

PageTable = list[int]
Copy = tuple[int, int]  # (source page, destination page) for PagedKVCache.copy_pages


class PageRefcountError(JinferError, ValueError):
  """A page was freed or shared while not allocated: a bookkeeping bug in the caller."""


def pages_for(length: int, page_size: int) -> int:
  """How many pages hold `length` tokens."""
  return -(-length // page_size)


class PageAllocator:
  """Allocates pages of a pool of `num_pages`, counting references so pages can be shared."""

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages must be at least 1, got {num_pages}.")
    self.num_pages = num_pages
    self._refcounts = [0] * num_pages
    # A stack popped from the end: pages come out lowest id first from a fresh allocator.
    self._free = list(range(num_pages - 1, -1, -1))

  @property
  def num_free(self) -> int:
    """Pages no sequence holds now."""
    return len(self._free)

  def refcount(self, page: int) -> int:
    """How many tables hold `page` (0 when it is free)."""
    return self._refcounts[page]

  def allocate(self, n: int) -> PageTable:
    """Takes `n` free pages (reference count 1 each); raises CacheFullError if too few are free."""
    if n < 0:
      raise ValueError(f"Cannot allocate a negative number of pages ({n}).")
    self._check_free(n)
    pages = [self._free.pop() for _ in range(n)]
    for page in pages:
      self._refcounts[page] = 1
    return pages

  def free(self, pages: Iterable[int]) -> None:
    """Drops one reference to each page; a page whose count reaches 0 returns to the free list."""
    counts = self._checked_counts(pages, "free")
    for page, times in counts.items():
      if self._refcounts[page] < times:
        raise PageRefcountError(
            f"Page {page} is freed {times} time(s) but held by only {self._refcounts[page]} "
            f"table(s): free each table once, and only pages from allocate/share/fork.")
    for page, times in counts.items():
      self._refcounts[page] -= times
      if self._refcounts[page] == 0:
        self._free.append(page)

  def share(self, pages: Iterable[int]) -> None:
    """Adds one reference to each (allocated) page: for a prefix or a fork that reuses them."""
    counts = self._checked_counts(pages, "share")
    for page in counts:
      if self._refcounts[page] == 0:
        raise PageRefcountError(
            f"Page {page} is free and cannot be shared: share only pages a live table holds.")
    for page, times in counts.items():
      self._refcounts[page] += times

  def fork(self, table: Sequence[int]) -> PageTable:
    """A new table holding the same pages as `table` (n > 1 samples, beam forks)."""
    self.share(table)
    return list(table)

  def writable(self, table: Sequence[int], index: int) -> tuple[PageTable, Optional[Copy]]:
    """Makes `table[index]` safe to write: copy-on-write if another table holds that page.

    Returns the (possibly new) table and None, or (src, dst) when the page was shared: `dst` is a
    fresh page replacing `src` in the table, and the caller must copy src's K/V into it
    (`PagedKVCache.copy_pages`) before writing.
    """
    src = table[index]
    if self.refcount(src) == 0:
      raise PageRefcountError(f"Page {src} at index {index} is free: the table is stale.")
    if self.refcount(src) == 1:
      return list(table), None
    (dst,) = self.allocate(1)  # may raise CacheFullError; nothing has changed yet
    self._refcounts[src] -= 1
    new_table = list(table)
    new_table[index] = dst
    return new_table, (src, dst)

  def grow(self, table: Sequence[int], length: int, page_size: int) -> PageTable:
    """`table` extended with fresh pages so it covers `length` tokens (never shrinks)."""
    missing = pages_for(length, page_size) - len(table)
    return list(table) + self.allocate(max(missing, 0))

  def reserve(self, table: Sequence[int], length: int, new_length: int,
              page_size: int) -> tuple[PageTable, Optional[Copy]]:
    """Makes positions [length, new_length) of a table holding `length` tokens safe to write.

    The page holding position `length`, when the table has it and shares it (a partial last
    page of a forked prompt), is copied first as in `writable`; fresh pages cover the rest.
    Returns the new table and the (src, dst) copy or None. All or nothing: raises
    CacheFullError, changing nothing, if too few pages are free.
    """
    index = length // page_size
    shared = index < len(table) and self.refcount(table[index]) > 1
    self._check_free(int(shared) + max(pages_for(new_length, page_size) - len(table), 0))
    table, copy = self.writable(table, index) if index < len(table) else (list(table), None)
    return self.grow(table, new_length, page_size), copy

  def _check_free(self, n: int) -> None:
    if n > len(self._free):
      raise CacheFullError(
          f"KV cache is full: {n} pages needed but only {len(self._free)} of {self.num_pages} "
          f"are free. Lower the batch size or max_tokens, or raise num_pages.")

  def _checked_counts(self, pages: Iterable[int], verb: str) -> collections.Counter:
    counts = collections.Counter(int(p) for p in pages)
    for page in counts:
      if not 0 <= page < self.num_pages:
        raise PageRefcountError(
            f"Cannot {verb} page {page}: page ids run from 0 to {self.num_pages - 1}.")
    return counts


def page_table_array(tables: Sequence[Sequence[int]], max_pages_per_seq: int) -> np.ndarray:
  """Stacks page tables into an int32 [B, max_pages_per_seq] array padded with NO_PAGE."""
  out = np.full((len(tables), max_pages_per_seq), NO_PAGE, np.int32)
  for b, table in enumerate(tables):
    if len(table) > max_pages_per_seq:
      raise CacheFullError(
          f"Sequence {b} needs {len(table)} pages but a sequence may hold at most "
          f"{max_pages_per_seq}: lower max_tokens or raise max_pages_per_seq.")
    out[b, :len(table)] = table
  return out
