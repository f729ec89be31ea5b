"""Chunked prefill through a paged KV cache equals one-shot prefill through a contiguous cache.

A prompt fed through `llama.forward` in chunks (each chunk attending over the pages written by
the chunks before it) must leave the same K/V in the cache and give the same last-position
logits as one forward pass over the whole prompt; decoding on from either cache must then agree.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.cache import KVCache, PagedKVCache
from jinfer.cache.page_allocator import PageAllocator, page_table_array, pages_for
from jinfer.models import config as C
from jinfer.models import llama

CFG = C.TINY_GQA
PAD_POSITION = 10**6  # out of range for both caches: the write is dropped
PAGE_SIZE = 4  # small, so chunks start and end inside pages
PROMPT_LENS = (23, 9, 16)  # ragged batch
DECODE_STEPS = 5
RAGGED_WIDTH = 8  # tokens per call of the ragged schedule (rows use 1..8 of them)
ATOL = 1e-5

_forward = jax.jit(llama.forward, static_argnums=1)


@pytest.fixture(scope="module")
def params(tiny_model):
  assert tiny_model.config == CFG
  return tiny_model.params


class _PagedRun:
  """A NaN-filled paged cache with shuffled (non-contiguous) page ids, grown by the host."""

  def __init__(self, num_pages: int, max_pages_per_seq: int, attention_impl: str, seed: int):
    self.alloc = PageAllocator(num_pages)
    # Take every page, then hand them back in a random order: tables get scattered page ids.
    order = np.random.default_rng(seed).permutation(self.alloc.allocate(num_pages))
    for page in order[::-1]:
      self.alloc.free([int(page)])
    self.tables = [[] for _ in PROMPT_LENS]
    self.max_pages_per_seq = max_pages_per_seq
    cache = PagedKVCache.init(CFG, num_pages, PAGE_SIZE, len(PROMPT_LENS), max_pages_per_seq,
                              attention_impl=attention_impl)
    nan = lambda pages: jnp.full_like(pages, jnp.nan)  # a stray read shows in the logits
    self.cache = cache.replace(k_pages=tuple(map(nan, cache.k_pages)),
                               v_pages=tuple(map(nan, cache.v_pages)))

  def grow(self, lengths):
    """Gives row b pages for `lengths[b]` tokens; device lengths stay as the cache keeps them."""
    self.tables = [self.alloc.grow(t, n, PAGE_SIZE) for t, n in zip(self.tables, lengths)]
    self.cache = self.cache.with_page_tables(
        page_table_array(self.tables, self.max_pages_per_seq), self.cache.lengths)


def _chunk_bounds(schedule, length: int, rng: np.random.Generator) -> list[int]:
  """Chunk boundaries 0 = c0 < c1 < ... = length: fixed-size chunks, or random sizes 1..8."""
  if schedule == "ragged":
    sizes = rng.integers(1, RAGGED_WIDTH + 1, size=length)
    return [0] + [b for b in np.cumsum(sizes).tolist() if b < length] + [length]
  return list(range(0, length, schedule)) + [length]


def _plan(schedule, seed: int) -> tuple[int, list[list[tuple[int, int]]]]:
  """(tokens per call, per call the [start, stop) of each row's prompt it feeds).

  Rows advance independently: in the ragged schedule one call holds chunks at different offsets
  and of different sizes, and rows that are done feed nothing (an empty span).
  """
  rng = np.random.default_rng(seed)
  bounds = [_chunk_bounds(schedule, n, rng) for n in PROMPT_LENS]
  calls = max(len(b) - 1 for b in bounds)
  spans = [[(b[min(i, len(b) - 1)], b[min(i + 1, len(b) - 1)]) for b in bounds]
           for i in range(calls)]
  return (RAGGED_WIDTH if schedule == "ragged" else schedule), spans


def _chunked_prefill(params, run: _PagedRun, prompts_BxT: np.ndarray, schedule, seed: int):
  """Feeds the prompts chunk by chunk; returns the logits [B, V] of each row's last token."""
  width, plan = _plan(schedule, seed)
  last_BxV = np.full((len(PROMPT_LENS), CFG.vocab_size), np.nan, np.float32)
  for spans in plan:
    tokens_BxT = np.zeros((len(spans), width), np.int32)
    positions_BxT = np.full((len(spans), width), PAD_POSITION, np.int32)
    for b, (start, stop) in enumerate(spans):
      tokens_BxT[b, :stop - start] = prompts_BxT[b, start:stop]
      positions_BxT[b, :stop - start] = np.arange(start, stop)
    run.grow([stop for _, stop in spans])
    logits_BxTxV, run.cache = _forward(params, CFG, jnp.asarray(tokens_BxT),
                                       jnp.asarray(positions_BxT), run.cache)
    for b, (start, stop) in enumerate(spans):
      if stop > start and stop == PROMPT_LENS[b]:
        last_BxV[b] = np.asarray(logits_BxTxV[b, stop - start - 1])
  return last_BxV


def _one_shot_prefill(params, prompts_BxT: np.ndarray, max_len: int):
  """The contiguous-cache reference: the whole ragged batch in one call."""
  t = prompts_BxT.shape[1]
  real_BxT = np.arange(t)[None, :] < np.asarray(PROMPT_LENS)[:, None]
  positions_BxT = np.where(real_BxT, np.arange(t)[None, :], PAD_POSITION).astype(np.int32)
  dense = KVCache.init(CFG, len(PROMPT_LENS), max_len)
  logits_BxTxV, dense = _forward(params, CFG, jnp.asarray(prompts_BxT),
                                 jnp.asarray(positions_BxT), dense)
  last_BxV = np.asarray(logits_BxTxV)[np.arange(len(PROMPT_LENS)), np.asarray(PROMPT_LENS) - 1]
  return last_BxV, dense


@functools.cache
def _prompts() -> np.ndarray:
  shape = (len(PROMPT_LENS), max(PROMPT_LENS))
  return np.random.default_rng(0).integers(0, CFG.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("schedule,attention_impl", [
    (16, "xla"), (7, "xla"), ("ragged", "xla"), ("ragged", "pallas")])
def test_chunked_paged_prefill_matches_one_shot_contiguous(params, schedule, attention_impl):
  """Same logits, cache contents and greedy tokens; the paged pool starts as NaN.

  With attention_impl="pallas" the decode steps run the paged-attention kernel (interpret mode
  on CPU) over pages the chunks wrote through the gather path.
  """
  max_pages = pages_for(max(PROMPT_LENS) + DECODE_STEPS, PAGE_SIZE)
  run = _PagedRun(len(PROMPT_LENS) * max_pages + 3, max_pages, attention_impl,
                  seed=len(str(schedule)))
  want_BxV, dense = _one_shot_prefill(params, _prompts(), max_pages * PAGE_SIZE)
  got_BxV = _chunked_prefill(params, run, _prompts(), schedule, seed=1)
  np.testing.assert_allclose(got_BxV, want_BxV, atol=ATOL, rtol=ATOL)
  lengths = np.asarray(PROMPT_LENS)
  assert np.asarray(run.cache.lengths).tolist() == lengths.tolist()
  for layer in range(CFG.n_layers):
    k_BxKxSxH, v_BxKxSxH, _ = run.cache.keys_values(layer)
    for b, n in enumerate(PROMPT_LENS):
      np.testing.assert_allclose(k_BxKxSxH[b, :, :n], dense.k[layer][b, :, :n], atol=ATOL)
      np.testing.assert_allclose(v_BxKxSxH[b, :, :n], dense.v[layer][b, :, :n], atol=ATOL)
  assert all(len(set(t)) == len(t) for t in run.tables)
  assert any(np.any(np.diff(t) != 1) for t in run.tables)  # the pages really are scattered

  # Greedy decode on from both caches: same logits, same tokens.
  next_B = jnp.asarray(want_BxV.argmax(-1), jnp.int32)
  for _ in range(DECODE_STEPS):
    run.grow(lengths + 1)
    positions_Bx1 = jnp.asarray(lengths[:, None], jnp.int32)
    want, dense = _forward(params, CFG, next_B[:, None], positions_Bx1, dense)
    got, run.cache = _forward(params, CFG, next_B[:, None], positions_Bx1, run.cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=ATOL)
    next_B = jnp.argmax(want[:, 0], axis=-1).astype(jnp.int32)
    np.testing.assert_array_equal(jnp.argmax(got[:, 0], axis=-1), next_B)
    lengths = lengths + 1
  assert np.asarray(run.cache.lengths).tolist() == lengths.tolist()

  # Pages no row ever held were never written (the pool started as NaN).
  unused = sorted(set(range(run.cache.num_pages)) - {p for t in run.tables for p in t})
  assert unused
  for pages in run.cache.k_pages + run.cache.v_pages:
    assert np.isnan(np.asarray(pages)[:, unused]).all()


def test_ragged_plan_mixes_offsets_and_sizes():
  """The ragged schedule really feeds rows at different offsets and sizes in one call."""
  width, plan = _plan("ragged", seed=1)
  assert width == RAGGED_WIDTH
  for b, n in enumerate(PROMPT_LENS):
    spans = [call[b] for call in plan]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(s1 == s0 for (_, s0), (s1, _) in itertools.pairwise(spans))  # contiguous cover
    assert all(0 <= stop - start <= RAGGED_WIDTH for start, stop in spans)
  assert any(len({start for start, stop in call if stop > start}) > 1 for call in plan)
  assert any(len({stop - start for start, stop in call if stop > start}) > 1 for call in plan)


@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
@pytest.mark.parametrize("num_chunks", [1, 2, 7])
def test_packed_chunks_give_one_shot_logits_at_every_position(params, num_chunks,
                                                              attention_impl):
  """The engine's layout: each chunk is a pack of one-token rows over the sequence's pages
  (`packed_query_starts`), plus padding rows of no sequence; with "pallas" the pack runs
  through the ragged kernel (interpret mode here). Every position's logits equal the one-shot
  contiguous pass's, for 1, 2 and 7 chunks of uneven sizes."""
  length, padding = max(PROMPT_LENS), 3
  prompt_T = _prompts()[0, :length]
  positions_T = np.arange(length, dtype=np.int32)
  want_TxV, _ = _forward(params, CFG, jnp.asarray(prompt_T[None]), jnp.asarray(positions_T[None]),
                         KVCache.init(CFG, 1, 32))
  max_pages = pages_for(length, PAGE_SIZE)
  table_1xM = np.random.default_rng(num_chunks).permutation(max_pages + 2)[None, :max_pages]
  cache = PagedKVCache.init(CFG, max_pages + 2, PAGE_SIZE, 1, max_pages,
                            attention_impl=attention_impl)
  nan = lambda pages: jnp.full_like(pages, jnp.nan)
  cache = cache.replace(k_pages=tuple(map(nan, cache.k_pages)),
                        v_pages=tuple(map(nan, cache.v_pages)))
  bounds = np.linspace(0, length, num_chunks + 1).astype(int)
  bounds[1:-1] += np.arange(num_chunks - 1) % 2  # uneven sizes, starts inside pages
  got = []
  for start, stop in itertools.pairwise(bounds.tolist()):
    rows = stop - start + padding
    tables_RxM = np.full((rows, max_pages), -1, np.int32)
    tables_RxM[:stop - start] = table_1xM
    tokens_R = np.zeros((rows,), np.int32)
    tokens_R[:stop - start] = prompt_T[start:stop]
    pack_positions_R = np.zeros((rows,), np.int32)
    pack_positions_R[:stop - start] = positions_T[start:stop]
    view = cache.with_page_tables(tables_RxM, np.zeros((rows,), np.int32)).replace(
        packed_query_starts=jnp.asarray([0, stop - start], jnp.int32))
    logits_Rx1xV, view = _forward(params, CFG, jnp.asarray(tokens_R[:, None]),
                                  jnp.asarray(pack_positions_R[:, None]), view)
    got.append(np.asarray(logits_Rx1xV[:stop - start, 0]))
    cache = view.with_page_tables(table_1xM.astype(np.int32), [stop]).replace(
        packed_query_starts=None)
  np.testing.assert_allclose(np.concatenate(got), np.asarray(want_TxV[0]), atol=ATOL, rtol=ATOL)
