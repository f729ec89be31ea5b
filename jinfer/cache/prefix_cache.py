"""Prefix caching: full KV pages kept after their sequence ends, found again by their tokens.

A full page is keyed by a hash of every token from the start of the sequence to the page's end
(a chain: each page's key hashes its parent's key and its own tokens), so a key names one exact
prefix. A new sequence reuses the longest run of cached pages its tokens match, sharing them
(refcounts) instead of computing them again; it then writes only at positions past them, in
pages of its own.

The cache holds one reference on every page it keeps, so a cached page outlives the sequences
that wrote it; a cached page that only the cache holds is free for all purposes and is evicted,
least recently used first, when the pool needs room.

Plain host-side Python over a `PageAllocator`; the device never knows.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

from jinfer.cache.page_allocator import PageAllocator, PageTable


class PrefixCache:
  """Full pages by prefix hash over `allocator`'s pool of `page_size`-token pages."""

  def __init__(self, allocator: PageAllocator, page_size: int):
    self.allocator = allocator
    self.page_size = page_size
    self._page_by_key: dict[bytes, int] = {}
    self._key_by_page: dict[int, bytes] = {}
    self._recent: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

  @property
  def num_evictable(self) -> int:
    """Cached pages no sequence holds: free for all purposes."""
    return sum(self.allocator.refcount(p) == 1 for p in self._key_by_page)

  @property
  def num_cached(self) -> int:
    """Full pages the cache holds by their prefix key (in use or evictable)."""
    return len(self._key_by_page)

  def keys(self, tokens: Sequence[int]) -> list[bytes]:
    """The key of every full page of `tokens`."""
    keys, parent = [], b""
    array = np.asarray(tokens, np.int64)
    for end in range(self.page_size, len(array) + 1, self.page_size):
      parent = hashlib.sha256(parent + array[end - self.page_size:end].tobytes()).digest()
      keys.append(parent)
    return keys

  def lookup(self, tokens: Sequence[int], max_tokens: int) -> PageTable:
    """The cached pages of the longest cached prefix of `tokens` (at most `max_tokens` tokens),
    shared with the caller (one reference each: free them like allocated pages)."""
    pages = []
    for key in self.keys(tokens[:max_tokens]):
      page = self._page_by_key.get(key)
      if page is None:
        break
      pages.append(page)
    self.allocator.share(pages)
    for page in pages:
      self._recent.move_to_end(page)
    return pages

  def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
    """Caches the full pages of `tokens` (held in `pages`, one per page) not cached yet."""
    for key, page in zip(self.keys(tokens), pages):
      if key in self._page_by_key or page in self._key_by_page:
        continue  # the same prefix computed twice, or a page already cached under its key
      self.allocator.share([page])
      self._page_by_key[key], self._key_by_page[page] = page, key
      self._recent[page] = None

  def allocate(self, n: int) -> PageTable:
    """`n` fresh pages, evicting least recently used cached pages that nobody holds if the free
    list is short. Raises CacheFullError (changing nothing) if even that is not enough."""
    if n > self.allocator.num_free + self.num_evictable:
      return self.allocator.allocate(n)  # raises CacheFullError
    for page in list(self._recent):
      if self.allocator.num_free >= n:
        break
      if self.allocator.refcount(page) == 1:
        self._evict(page)
    return self.allocator.allocate(n)

  def _evict(self, page: int) -> None:
    del self._page_by_key[self._key_by_page.pop(page)]
    del self._recent[page]
    self.allocator.free([page])

  def clear(self) -> None:
    """Forgets every page no sequence holds."""
    for page in [p for p in self._recent if self.allocator.refcount(p) == 1]:
      self._evict(page)
