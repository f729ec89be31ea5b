"""Paged KV cache: allocator invariants, model parity with the contiguous cache, copy-on-write."""

import collections
import functools

import chex
import hypothesis
import hypothesis.strategies as st
from hypothesis import stateful
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.cache import (NO_PAGE, KVCache, PageAllocator, PagedKVCache, PageRefcountError,
                          page_table_array, pages_for)
from jinfer.errors import CacheFullError, JinferError
from jinfer.models import config as C
from jinfer.models import llama

CFG = C.TINY_GQA
PAD_POSITION = 10**6  # out of range for both caches: the write is dropped


# ----------------------------------------------------------------------------------------------
# Allocator: a random program of operations checked against a model of live tables.


class AllocatorMachine(stateful.RuleBasedStateMachine):
  """Live tables are the model; the allocator's counts must always agree with them."""

  def __init__(self):
    super().__init__()
    self.num_pages = 12
    self.alloc = PageAllocator(self.num_pages)
    self.tables: list[list[int]] = []

  def _snapshot(self):
    return ([self.alloc.refcount(p) for p in range(self.num_pages)], self.alloc.num_free)

  def _pick(self, data) -> int:
    return data.draw(st.integers(0, len(self.tables) - 1))

  @stateful.rule(n=st.integers(0, 14))
  def allocate(self, n):
    free_before = {p for p in range(self.num_pages) if self.alloc.refcount(p) == 0}
    if n > len(free_before):
      before = self._snapshot()
      with pytest.raises(CacheFullError):
        self.alloc.allocate(n)
      assert self._snapshot() == before  # nothing allocated on failure
      return
    pages = self.alloc.allocate(n)
    assert len(pages) == len(set(pages)) == n and set(pages) <= free_before
    self.tables.append(pages)

  @stateful.precondition(lambda self: self.tables)
  @stateful.rule(data=st.data())
  def fork(self, data):
    self.tables.append(self.alloc.fork(self.tables[self._pick(data)]))

  @stateful.precondition(lambda self: self.tables)
  @stateful.rule(data=st.data(), extra=st.integers(0, 3))
  def share_prefix(self, data, extra):
    """A new sequence reusing another's first pages (prefix cache) plus fresh pages."""
    source = self.tables[self._pick(data)]
    prefix = source[:data.draw(st.integers(0, len(source)))]
    if extra > self.alloc.num_free:
      return
    self.alloc.share(prefix)
    self.tables.append(prefix + self.alloc.allocate(extra))

  @stateful.precondition(lambda self: self.tables)
  @stateful.rule(data=st.data())
  def free(self, data):
    self.alloc.free(self.tables.pop(self._pick(data)))

  @stateful.precondition(lambda self: any(self.tables))
  @stateful.rule(data=st.data())
  def writable(self, data):
    i = data.draw(st.sampled_from([i for i, t in enumerate(self.tables) if t]))
    index = data.draw(st.integers(0, len(self.tables[i]) - 1))
    page = self.tables[i][index]
    holders = self._holders()[page]
    if holders > 1 and self.alloc.num_free == 0:
      before = self._snapshot()
      with pytest.raises(CacheFullError):
        self.alloc.writable(self.tables[i], index)
      assert self._snapshot() == before
      return
    table, copy = self.alloc.writable(self.tables[i], index)
    if holders == 1:
      assert copy is None and table == self.tables[i]
    else:
      src, dst = copy
      assert src == page and table[index] == dst and self._holders()[dst] == 0
      others = lambda t: t[:index] + t[index + 1:]
      assert others(table) == others(self.tables[i])
    self.tables[i] = table

  @stateful.precondition(lambda self: self.tables)
  @stateful.rule(data=st.data(), length=st.integers(0, 40))
  def grow(self, data, length):
    i = self._pick(data)
    needed = max(pages_for(length, 4) - len(self.tables[i]), 0)
    if needed > self.alloc.num_free:
      with pytest.raises(CacheFullError):
        self.alloc.grow(self.tables[i], length, 4)
      return
    table = self.alloc.grow(self.tables[i], length, 4)
    assert table[:len(self.tables[i])] == self.tables[i]
    assert len(table) == max(len(self.tables[i]), pages_for(length, 4))
    self.tables[i] = table

  @stateful.rule(page=st.integers(0, 11))
  def free_of_a_free_page_raises(self, page):
    if self._holders()[page] == 0:
      before = self._snapshot()
      with pytest.raises(PageRefcountError):
        self.alloc.free([page])
      with pytest.raises(PageRefcountError):
        self.alloc.share([page])
      assert self._snapshot() == before

  def _holders(self) -> collections.Counter:
    return collections.Counter(p for table in self.tables for p in table)

  @stateful.invariant()
  def refcounts_equal_holders(self):
    holders = self._holders()
    for page in range(self.num_pages):
      assert self.alloc.refcount(page) == holders[page]
    # No page appears twice in one table, so a page in two tables is there only by sharing.
    assert all(len(set(t)) == len(t) for t in self.tables)
    assert self.alloc.num_free == self.num_pages - len(holders)

  def teardown(self):
    for table in self.tables:
      self.alloc.free(table)
    assert self.alloc.num_free == self.num_pages  # every freed page came back, once
    assert sorted(self.alloc.allocate(self.num_pages)) == list(range(self.num_pages))


AllocatorMachine.TestCase.settings = hypothesis.settings(
    max_examples=150, stateful_step_count=30, deadline=None)
TestAllocator = AllocatorMachine.TestCase


def test_cache_full_error_says_what_is_free_and_what_to_change():
  alloc = PageAllocator(4)
  held = alloc.allocate(3)
  with pytest.raises(CacheFullError) as info:
    alloc.allocate(2)
  message = str(info.value)
  assert "2 pages needed" in message and "only 1 of 4" in message
  assert "batch" in message and "max_tokens" in message and "num_pages" in message
  assert isinstance(info.value, JinferError)
  assert alloc.num_free == 1 and all(alloc.refcount(p) == 1 for p in held)
  with pytest.raises(CacheFullError, match="at most 2"):
    page_table_array([[0, 1, 2]], max_pages_per_seq=2)


def test_double_free_raises_and_changes_nothing():
  alloc = PageAllocator(3)
  (page,) = alloc.allocate(1)
  with pytest.raises(PageRefcountError, match="freed 2 time"):
    alloc.free([page, page])
  assert alloc.refcount(page) == 1
  alloc.free([page])
  with pytest.raises(PageRefcountError):
    alloc.free([page])
  assert alloc.num_free == 3


# ----------------------------------------------------------------------------------------------
# Device cache: the model through pages equals the model through the contiguous cache.


@functools.lru_cache(maxsize=None)
def _params():
  return llama.init_params(CFG, jax.random.key(0))


_forward = jax.jit(llama.forward, static_argnums=1)


def _nan_pool(cache: PagedKVCache) -> PagedKVCache:
  """Every page NaN (int8: every scale NaN, codes -77): a stale read shows up in the logits."""
  nan = lambda pages: jnp.full_like(pages, -77 if pages.dtype == jnp.int8 else jnp.nan)
  return cache.replace(k_pages=tuple(map(nan, cache.k_pages)),
                       v_pages=tuple(map(nan, cache.v_pages)),
                       k_scales=tuple(map(nan, cache.k_scales)),
                       v_scales=tuple(map(nan, cache.v_scales)))


class _PagedRun:
  """A paged cache with shuffled (non-contiguous) pages, grown on demand by the host."""

  def __init__(self, batch, num_pages, page_size, max_pages_per_seq, seed, dtype=jnp.float32):
    self.alloc = PageAllocator(num_pages)
    # Take every page, then hand them back in a random order: tables get scattered page ids.
    order = np.random.default_rng(seed).permutation(self.alloc.allocate(num_pages))
    for page in order[::-1]:
      self.alloc.free([int(page)])
    self.tables = [[] for _ in range(batch)]
    self.max_pages_per_seq = max_pages_per_seq
    self.cache = _nan_pool(PagedKVCache.init(CFG, num_pages, page_size, batch, max_pages_per_seq,
                                             dtype))

  def grow(self, lengths):
    """Covers `lengths[b]` tokens in row b, leaving the device lengths as the cache keeps them."""
    self.tables = [self.alloc.grow(t, n, self.cache.page_size)
                   for t, n in zip(self.tables, lengths)]
    self.cache = self.cache.with_page_tables(
        page_table_array(self.tables, self.max_pages_per_seq), self.cache.lengths)


@pytest.mark.parametrize("page_size,prompt_lens,dtype", [
    (4, (4, 3, 8), jnp.float32), (8, (8, 1, 5), jnp.float32), (4, (5, 2, 8), jnp.int8)])
def test_paged_cache_matches_contiguous_cache(page_size, prompt_lens, dtype):
  """int8 too: both caches quantize the same K/V the same way, and the gather path dequantizes."""
  params, batch, steps = _params(), len(prompt_lens), 6
  rng = np.random.default_rng(page_size)
  t = max(prompt_lens)
  max_pages = pages_for(t + steps, page_size)
  tokens_BxT = jnp.asarray(rng.integers(0, CFG.vocab_size, (batch, t)), jnp.int32)
  real_BxT = np.arange(t)[None, :] < np.asarray(prompt_lens)[:, None]
  positions_BxT = jnp.asarray(np.where(real_BxT, np.arange(t)[None, :], PAD_POSITION), jnp.int32)

  dense = KVCache.init(CFG, batch, max_pages * page_size, dtype)
  paged = _PagedRun(batch, num_pages=batch * max_pages + 2, page_size=page_size,
                    max_pages_per_seq=max_pages, seed=page_size, dtype=dtype)
  paged.grow(prompt_lens)
  want, dense = _forward(params, CFG, tokens_BxT, positions_BxT, dense)
  got, paged.cache = _forward(params, CFG, tokens_BxT, positions_BxT, paged.cache)
  np.testing.assert_allclose(np.asarray(got)[real_BxT], np.asarray(want)[real_BxT], atol=1e-5)
  assert np.asarray(paged.cache.lengths).tolist() == list(prompt_lens)  # ragged, pads dropped

  lengths = np.asarray(prompt_lens)
  next_B = jnp.argmax(want[jnp.arange(batch), lengths - 1], axis=-1).astype(jnp.int32)
  for _ in range(steps):
    paged.grow(lengths + 1)
    positions_Bx1 = jnp.asarray(lengths[:, None], jnp.int32)
    want, dense = _forward(params, CFG, next_B[:, None], positions_Bx1, dense)
    got, paged.cache = _forward(params, CFG, next_B[:, None], positions_Bx1, paged.cache)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    next_B = jnp.argmax(want[:, 0], axis=-1).astype(jnp.int32)
    np.testing.assert_array_equal(jnp.argmax(got[:, 0], axis=-1), next_B)  # same greedy tokens
    lengths = lengths + 1
  assert np.asarray(paged.cache.lengths).tolist() == lengths.tolist()

  # Pages no row ever held were never written.
  used = {p for table in paged.tables for p in table}
  unused = [p for p in range(paged.cache.num_pages) if p not in used]
  floats = paged.cache.k_scales + paged.cache.v_scales if dtype == jnp.int8 else (
      paged.cache.k_pages + paged.cache.v_pages)
  for pool in floats:
    assert np.isnan(np.asarray(pool)[:, unused]).all()


def test_writes_without_a_page_or_out_of_range_are_dropped():
  cache = PagedKVCache.init(CFG, num_pages=4, page_size=4, batch=2, max_pages_per_seq=2)
  cache = cache.with_page_tables([[2, NO_PAGE], [NO_PAGE, NO_PAGE]], [0, 0])
  k_BxTxKxH = jnp.ones((2, 4, CFG.n_kv_heads, CFG.head_dim))
  positions_BxT = jnp.asarray([[3, 4, -1, 8], [0, 1, 2, 3]], jnp.int32)
  cache = cache.write(0, k_BxTxKxH, 2 * k_BxTxKxH, positions_BxT)
  k_pages = np.asarray(cache.k_pages[0])
  assert (k_pages[:, 2, 3] == 1).all() and k_pages.sum() == CFG.n_kv_heads * CFG.head_dim
  assert np.asarray(cache.lengths).tolist() == [4, 0]
  k, v, positions_S = cache.keys_values(0)
  chex.assert_shape([k, v], (2, CFG.n_kv_heads, 8, CFG.head_dim))
  assert np.asarray(positions_S).tolist() == list(range(8))
  assert (np.asarray(v)[0, :, 3] == 2).all() and np.asarray(v).sum() == 2 * k_pages.sum()


def test_copy_on_write_keeps_the_other_fork_unchanged():
  params, page_size, max_pages, prompt_len = _params(), 4, 3, 6
  alloc = PageAllocator(8)
  cache = _nan_pool(PagedKVCache.init(CFG, 8, page_size, 2, max_pages))
  prompt_1xT = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (1, prompt_len)))
  positions_1xT = jnp.arange(prompt_len)[None, :]

  # Row 0 prefills; row 1 writes nothing (out-of-range positions) and then forks row 0.
  table0 = alloc.grow([], prompt_len, page_size)
  cache = cache.with_page_tables(page_table_array([table0, []], max_pages), [0, 0])
  _, cache = _forward(params, CFG, jnp.concatenate([prompt_1xT, prompt_1xT]),
                      jnp.concatenate([positions_1xT, positions_1xT + PAD_POSITION]), cache)
  table1 = alloc.fork(table0)
  assert alloc.refcount(table0[-1]) == 2
  cache = cache.with_page_tables(page_table_array([table0, table1], max_pages),
                                 [prompt_len, prompt_len])
  before = [cache.keys_values(layer) for layer in range(CFG.n_layers)]

  # Row 1 appends a token at position 6, inside the shared last page: copy it first.
  table1, copy = alloc.writable(table1, prompt_len // page_size)
  assert copy is not None and copy[0] == table0[-1] and table1[-1] == copy[1]
  assert alloc.refcount(table0[-1]) == 1 and alloc.refcount(table1[0]) == 2  # first page shared
  cache = cache.copy_pages([copy[0]], [copy[1]])
  cache = cache.with_page_tables(page_table_array([table0, table1], max_pages), cache.lengths)
  token = jnp.asarray([[0], [7]], jnp.int32)
  got, cache = _forward(params, CFG, token, jnp.asarray([[PAD_POSITION], [prompt_len]]), cache)

  assert np.asarray(cache.lengths).tolist() == [prompt_len, prompt_len + 1]
  for layer, (k0, v0, _) in enumerate(before):
    k1, v1, _ = cache.keys_values(layer)
    np.testing.assert_array_equal(k1[0], k0[0])  # row 0's view is untouched
    np.testing.assert_array_equal(v1[0], v0[0])
    np.testing.assert_array_equal(k1[1, :, :prompt_len], k0[0, :, :prompt_len])  # shared prefix
    assert not np.allclose(k1[1, :, prompt_len], 0)  # row 1's new key is in its private page

  # Row 1's logits equal a contiguous cache fed the prompt then the new token.
  dense = KVCache.init(CFG, 1, max_pages * page_size)
  _, dense = _forward(params, CFG, prompt_1xT, positions_1xT, dense)
  want, _ = _forward(params, CFG, token[1:], jnp.asarray([[prompt_len]]), dense)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[0]), atol=1e-5)
