"""attention_impl="pallas" with n > 1: the rows of a prompt share its pages (copy-on-write).

Sharing must not change a single token: every test compares with the contiguous cache ("xla").
The kernel runs in interpret mode on CPU, so prompts and outputs are kept short.
"""

import collections
import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.cache.page_allocator import NO_PAGE, PageAllocator, pages_for
from jinfer.buckets import bucket
from jinfer.decoding import generate as generate_lib
from jinfer.decoding import requests as requests_lib
from jinfer.decoding.results import GenerationStats
from jinfer.errors import CacheFullError

# With 8-token pages: a partial last page, a prompt of exactly two pages, one of a single token.
PROMPTS = [list(range(10, 21)), list(range(30, 46)), [7]]
GREEDY = jinfer.SamplingParams(n=2, max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)
SEEDED = jinfer.SamplingParams(n=2, max_tokens=4, temperature=1.0, top_p=0.9, seed=11,
                               ignore_eos=True)


def _paged(model, page_size=8, **changes):
  return dataclasses.replace(model, attention_impl="pallas", page_size=page_size, **changes)


def _assert_same(got, want, logprob_atol=1e-4):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert (g.index, g.token_ids) == (w.index, w.token_ids)
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=logprob_atol)


# Fast tier: the seeded case (its rows decode apart, so copy-on-write runs) and one page size;
# greedy pallas generation with n=2 is also test_attention_impl's fast test.
@pytest.mark.parametrize("params", [pytest.param(GREEDY, id="greedy", marks=pytest.mark.slow),
                                    pytest.param(SEEDED, id="seeded")])
def test_shared_prompt_pages_match_xla(tiny_model, params):
  want = jinfer.generate(tiny_model, PROMPTS, params)
  _assert_same(jinfer.generate(_paged(tiny_model), PROMPTS, params), want)
  if params.temperature:  # the n samples differ, so rows really decode apart
    assert len({tuple(c.token_ids) for c in want[:2]}) > 1


@pytest.mark.parametrize("page_size", [4, pytest.param(32, marks=pytest.mark.slow)])
def test_page_size_does_not_change_tokens(tiny_model, page_size):
  params = dataclasses.replace(GREEDY, logprobs=None)
  prompts = PROMPTS[:2]
  want = jinfer.generate(tiny_model, prompts, params)
  _assert_same(jinfer.generate(_paged(tiny_model, page_size), prompts, params), want)


def _check_plan(b, page_size: int) -> None:
  """Rows hold their prompt's full pages and own every page they write; the pool fits."""
  plan = b.pages
  batch, max_pages = plan.tables_BxM.shape
  held = plan.tables_BxM[plan.tables_BxM >= 0]
  holders = collections.Counter(held.tolist())
  pairs = list(zip(plan.copy_src_C.tolist(), plan.copy_dst_C.tolist()))
  copies = {dst: src for src, dst in pairs if src != dst}
  assert not {src for src, dst in pairs if src == dst} & copies.keys()  # padding copies: no-ops
  kept = collections.Counter()  # per prompt: rows that keep its partial page instead of a copy
  needed = 0  # distinct pages the batch must hold
  for row, r in enumerate(b.rows):
    length = len(b.prompt_ids[r.prompt])
    new_length, full = length + r.params.max_tokens, length // page_size
    table, prompt_table = plan.tables_BxM[row], plan.prompt_tables_PxM[r.prompt]
    assert (table >= 0).sum() == pages_for(new_length, page_size)
    np.testing.assert_array_equal(table[:full], prompt_table[:full])  # shared, prefill-written
    written = table[full:pages_for(new_length, page_size)].tolist()
    assert all(holders[page] == 1 for page in written)
    if length % page_size:  # the partial prompt page: the original or a copy of it
      kept[r.prompt] += int(written[0] == prompt_table[full])
      assert written[0] == prompt_table[full] or copies[written[0]] == prompt_table[full]
    needed += pages_for(new_length, page_size) - full
  for p, ids in enumerate(b.prompt_ids):
    assert kept[p] == (1 if len(ids) % page_size else 0)
    needed += len(ids) // page_size
  assert len(holders) == needed
  assert held.max() < plan.num_pages == min(bucket(needed, minimum=1),
                                            batch * max_pages)
  assert (plan.tables_BxM[len(b.rows):] == NO_PAGE).all()  # padding rows write nowhere
  assert (plan.prompt_tables_PxM[len(b.prompt_ids):] == NO_PAGE).all()


def test_rows_share_full_prompt_pages_and_own_what_they_write(tiny_model):
  params = dataclasses.replace(GREEDY, n=3)
  b = requests_lib.prepare_batch(_paged(tiny_model, page_size=8), PROMPTS, params)
  _check_plan(b, page_size=8)
  batch, max_pages = b.pages.tables_BxM.shape
  assert b.pages.num_pages < batch * max_pages


@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
                  ns=st.lists(st.integers(1, 4), min_size=4, max_size=4),
                  max_tokens=st.lists(st.integers(1, 20), min_size=4, max_size=4),
                  page_size=st.sampled_from([1, 3, 4, 8, 16]))
def test_page_plan_properties(tiny_model, lengths, ns, max_tokens, page_size):
  prompts = [[5] * n for n in lengths]
  params = [jinfer.SamplingParams(n=n, max_tokens=t) for n, t in zip(ns, max_tokens)]
  b = requests_lib.prepare_batch(_paged(tiny_model, page_size), prompts, params[:len(prompts)])
  _check_plan(b, page_size)


def test_reserve_copies_a_shared_partial_page_and_grows():
  alloc = PageAllocator(8)
  prompt = alloc.allocate(2)  # 6 tokens in pages of 4: page 1 is partial
  fork = alloc.fork(prompt)
  table, copy = alloc.reserve(fork, 6, 10, page_size=4)
  assert copy == (1, 2) and table == [0, 2, 3]
  assert [alloc.refcount(p) for p in range(4)] == [2, 1, 1, 1]
  table, copy = alloc.reserve(prompt, 6, 10, page_size=4)  # the last holder writes in place
  assert copy is None and table == [0, 1, 4]
  table, copy = alloc.reserve(alloc.fork([0]), 4, 5, page_size=4)  # full page: nothing to copy
  assert copy is None and table == [0, 5] and alloc.refcount(0) == 3


def test_reserve_is_all_or_nothing():
  alloc = PageAllocator(3)
  fork = alloc.fork(alloc.allocate(2))
  before = ([alloc.refcount(p) for p in range(3)], alloc.num_free)
  with pytest.raises(CacheFullError, match="2 pages needed but only 1"):
    alloc.reserve(fork, 6, 10, page_size=4)  # a copy of page 1 and a fresh page
  assert ([alloc.refcount(p) for p in range(3)], alloc.num_free) == before


def test_pool_holds_what_the_batch_uses(tiny_model):
  """One 40-token prompt, n=4, max_tokens=16, 16-token pages: 2 shared prompt pages, then per
  row the partial page (3 copies and the original) and a decode page: 10 pages, bucketed to 16
  (private tables needed 4 rows * 5 pages)."""
  b = requests_lib.prepare_batch(_paged(tiny_model, page_size=16), [list(range(40))],
                            jinfer.SamplingParams(n=4, max_tokens=16, ignore_eos=True))
  tables_BxM = b.pages.tables_BxM
  assert tables_BxM.shape == (4, 5) and np.unique(tables_BxM[tables_BxM >= 0]).size == 10
  assert b.pages.num_pages == 16


def test_prompt_bucket_is_whole_pages(tiny_model):
  for page_size, length in [(4, 16), (32, 32), (24, 24)]:
    b = requests_lib.prepare_batch(_paged(tiny_model, page_size), [[1] * 12],
                              jinfer.SamplingParams(max_tokens=2))
    assert b.tokens_PxT.shape[1] == length
  b = requests_lib.prepare_batch(dataclasses.replace(tiny_model, page_size=24), [[1] * 12],
                            jinfer.SamplingParams(max_tokens=2))
  assert b.tokens_PxT.shape[1] == 16 and b.pages is None  # pages matter only to "pallas"


# ----------------------------------------------------------------------------- int8 KV cache


@pytest.fixture(scope="module")
def int8_model(tiny_model):
  return dataclasses.replace(tiny_model, kv_cache_dtype="int8")


def _prefill_cache(model, params):
  b = requests_lib.prepare_batch(model, PROMPTS, params)
  return generate_lib.run_prefill(model, b, GenerationStats()).cache


def test_int8_cache_generate_xla(tiny_model, int8_model):
  cache = _prefill_cache(int8_model, GREEDY)
  assert cache.quantized and cache.k[0].dtype == jnp.int8
  want = jinfer.generate(tiny_model, PROMPTS, GREEDY)
  got = jinfer.generate(int8_model, PROMPTS, GREEDY)
  assert [len(c.token_ids) for c in got] == [GREEDY.max_tokens] * len(want)
  # The first token comes from the prefill: the int8 cache moves its logprobs only a little.
  np.testing.assert_allclose([c.logprobs[0] for c in got], [c.logprobs[0] for c in want],
                             atol=0.05)


@pytest.mark.slow  # (the int8 Pallas decode is also test_kv_int8's, in the fast tier)
def test_int8_cache_generate_pallas_matches_xla(int8_model):
  paged = _paged(int8_model)
  cache = _prefill_cache(paged, GREEDY)
  assert cache.quantized and cache.k_pages[0].dtype == jnp.int8
  _assert_same(jinfer.generate(paged, PROMPTS, GREEDY),
               jinfer.generate(int8_model, PROMPTS, GREEDY), logprob_atol=1e-3)
