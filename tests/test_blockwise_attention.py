"""Blockwise (online-softmax) attention equals the dense reference (and both a per-query loop, with
sliding windows and soft caps): ragged query positions per
row, keys past every query (skipped blocks), lengths that are not multiples of the block, query
blocks that see no key, and through the model and both caches."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.cache.kv_cache import KVCache
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.models import attention as attention_lib, llama


@pytest.mark.parametrize("batch,queries,extra_keys,kv_heads,group,block,start", [
    (1, 1, 0, 1, 1, 8, 0),      # one query, one key
    (2, 37, 50, 2, 3, 16, 5),   # ragged rows, keys past every query, lengths off the block
    (3, 64, 0, 1, 3, 16, 0),    # whole blocks
    (1, 90, 70, 2, 1, 32, 40),  # a chunk after 40 cached positions
    (2, 20, 3, 1, 1, 8, 17),
])
def test_blockwise_equals_dense(batch, queries, extra_keys, kv_heads, group, block, start):
  rng = np.random.default_rng(queries)
  keys, h = start + 2 * batch + queries + extra_keys, 8
  q = jnp.asarray(rng.standard_normal((batch, queries, kv_heads * group, h)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, kv_heads, keys, h)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((batch, kv_heads, keys, h)), jnp.float32)
  # Each row its own offset (ragged prompts); the keys past the last query are never visible.
  # (Every query sees at least its own key, as in a cache: a query that sees none gets 0 here
  # and the mean of the values from the dense pass; neither is ever used.)
  q_positions = jnp.asarray([np.arange(queries) + start + 2 * row for row in range(batch)],
                            jnp.int32)
  k_positions = jnp.arange(keys, dtype=jnp.int32)[None]
  want = attention_lib.dense_attention(q, k, v, q_positions, k_positions)
  got = attention_lib.blockwise_attention(q, k, v, q_positions, k_positions, block=block)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def _loop_attention(q, k, v, q_positions, k_positions, sliding_window, soft_cap):
  """One query and head at a time in float64: the plain definition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  group = n // k.shape[1]
  out = np.zeros_like(q)
  k_pos = np.asarray(k_positions)[0]
  for row in range(b):
    for i in range(t):
      p = int(q_positions[row, i])
      seen = (k_pos <= p) & ((k_pos > p - sliding_window) if sliding_window else True)
      for head in range(n):
        scores = k[row, head // group][seen] @ q[row, i, head] / np.sqrt(h)
        if soft_cap:
          scores = soft_cap * np.tanh(scores / soft_cap)
        w = np.exp(scores - scores.max())
        out[row, i, head] = w @ v[row, head // group][seen] / w.sum()
  return out


@pytest.mark.parametrize("batch,queries,start,block,sliding_window,soft_cap", [
    (2, 40, 0, 8, 5, None),      # a narrow window: most key blocks skipped before it
    (1, 64, 30, 16, 33, 2.0),    # window across block edges, after cached positions, soft cap
    (2, 23, 7, 8, None, 1.5),    # soft cap alone, ragged rows
    (1, 50, 0, 16, 1, None),     # a window of one: each query sees only itself
])
def test_window_and_soft_cap_blockwise_equal_dense_equal_a_loop(batch, queries, start, block,
                                                                 sliding_window, soft_cap):
  rng = np.random.default_rng(queries + block)
  keys, h, kv_heads, group = start + 2 * batch + queries + 5, 8, 2, 2
  q = jnp.asarray(rng.standard_normal((batch, queries, kv_heads * group, h)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, kv_heads, keys, h)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((batch, kv_heads, keys, h)), jnp.float32)
  q_positions = jnp.asarray([np.arange(queries) + start + 2 * row for row in range(batch)],
                            jnp.int32)
  k_positions = jnp.arange(keys, dtype=jnp.int32)[None]
  options = dict(sliding_window=sliding_window, soft_cap=soft_cap)
  want = _loop_attention(q, k, v, q_positions, k_positions, **options)
  dense = attention_lib.dense_attention(q, k, v, q_positions, k_positions, **options)
  got = attention_lib.blockwise_attention(q, k, v, q_positions, k_positions, block=block,
                                          **options)
  np.testing.assert_allclose(dense, want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_key_blocks_before_the_window_are_skipped():
  # Keys at positions 0..31 are NaN; queries at 48..63 with a window of 16 never see them, and
  # the blockwise pass must not read their blocks at all.
  q = jnp.ones((1, 16, 2, 4), jnp.float32)
  k = jnp.ones((1, 1, 64, 4), jnp.float32).at[:, :, :32].set(jnp.nan)
  v = jnp.ones((1, 1, 64, 4), jnp.float32).at[:, :, :32].set(jnp.nan)
  positions = jnp.arange(48, 64, dtype=jnp.int32)[None]
  out = attention_lib.blockwise_attention(q, k, v, positions, jnp.arange(64)[None], block=16,
                                          sliding_window=16)
  np.testing.assert_allclose(out, 1.0)


def test_key_blocks_past_the_queries_are_skipped():
  # Keys at positions 32.. are garbage (NaN); a query block at positions 0..15 must never read
  # their blocks, while the dense pass (which masks after multiplying) would turn them to NaN.
  q = jnp.ones((1, 16, 2, 4), jnp.float32)
  k = jnp.ones((1, 1, 64, 4), jnp.float32).at[:, :, 32:].set(jnp.nan)
  v = jnp.ones((1, 1, 64, 4), jnp.float32).at[:, :, 32:].set(jnp.nan)
  positions = jnp.arange(16, dtype=jnp.int32)[None]
  out = attention_lib.blockwise_attention(q, k, v, positions, jnp.arange(64)[None], block=16)
  np.testing.assert_allclose(out, 1.0)


def test_long_prompt_logits_blockwise_equal_dense_through_both_caches(tiny_model, monkeypatch):
  config = dataclasses.replace(tiny_model.config, max_seq_len=1024)
  tokens_1xT = jnp.asarray(np.random.default_rng(0).integers(0, 255, (1, 600)), jnp.int32)
  positions_1xT = jnp.arange(600, dtype=jnp.int32)[None]
  caches = {"none": lambda: None,
            "contiguous": lambda: KVCache.init(config, 1, 640),
            "contiguous int8": lambda: KVCache.init(config, 1, 640, jnp.int8),
            "paged": lambda: PagedKVCache.init(config, 40, 16, 1, 40).with_page_tables(
                jnp.arange(40)[None], jnp.zeros((1,), jnp.int32))}

  def logits(cache):  # traced anew at each call (eager), so the threshold below takes effect
    return llama.forward(tiny_model.params, config, tokens_1xT, positions_1xT, cache)[0]

  blockwise = {name: logits(make()) for name, make in caches.items()}  # 600 queries >= 512
  monkeypatch.setattr(attention_lib, "BLOCKWISE_MIN_QUERIES", 1 << 30)
  for name, make in caches.items():
    np.testing.assert_allclose(blockwise[name], logits(make()), atol=2e-5, err_msg=name)


def test_long_prompts_pad_to_multiples_of_256_not_powers_of_two(tiny_model):
  from jinfer.decoding import requests  # pylint: disable=g-import-not-at-top
  model = dataclasses.replace(
      tiny_model, config=dataclasses.replace(tiny_model.config, max_seq_len=4096))
  params = jinfer.SamplingParams(max_tokens=2)
  for length, padded in [(300, 512), (512, 512), (513, 768), (600, 768), (1025, 1280),
                         (3000, 3072)]:
    b = requests.prepare_batch(model, [[1] * length], params)
    assert b.tokens_PxT.shape[1] == padded, length
