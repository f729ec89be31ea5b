"""int8 KV cache: the quantizer's error bound, int8 contiguous and paged caches against float ones.

Figures measured when these tests were written (tiny random TINY_GQA model, CPU): greedy
rollouts of 4 prompts x 32 tokens through an int8 cache gave the float cache's tokens exactly
(max logit difference 1.6e-3 on logits of magnitude 0.64); one attention layer over N(0, 1) K/V
differs from the float cache's by 1.4e-2 at most, 2.6e-3 on average (see ATTENTION_ATOL).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.cache import KVCache, PagedKVCache, pages_for
from jinfer.decoding import beam_search
from jinfer.models import config as C
from jinfer.models import llama
from jinfer.quant.kv import dequantize_kv, quantize_kv

CFG = C.TINY_GQA
# One attention layer over N(0, 1) keys/values: each element moves by at most absmax / 254
# (about 0.012 at H = 16); outputs, averages of values, stay well inside this.
ATTENTION_ATOL = 3e-2
_forward = jax.jit(llama.forward, static_argnums=1)


# ----------------------------------------------------------------------------------------------
# The quantizer.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_error_is_at_most_half_a_step(dtype):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 2, 64)) * rng.uniform(1e-3, 1e3, size=(3, 5, 2, 1))
  x[0, 0, 0] = 0.0  # an all-zero vector
  x[1, 2, 1, 7] = -1e4  # one outlier: the rest of its vector loses precision, nothing breaks
  x = jnp.asarray(x, dtype)
  q, scale = quantize_kv(x)
  chex.assert_type([q, scale], [jnp.int8, jnp.float32])
  chex.assert_shape([q, scale], [x.shape, x.shape[:-1]])
  assert np.isfinite(np.asarray(scale)).all() and (np.asarray(scale) > 0).all()
  assert np.abs(np.asarray(q, np.int32)).max() <= 127  # symmetric: -128 is never used
  x32 = np.asarray(x.astype(jnp.float32))
  error = np.abs(x32 - np.asarray(dequantize_kv(q, scale)))
  bound = np.asarray(scale)[..., None] / 2
  assert (error <= bound + 1e-6 * np.abs(x32)).all()  # + float32 rounding of x / s * s
  nonzero = np.abs(x32).max(-1) > 0
  np.testing.assert_allclose(np.abs(x32).max(-1)[nonzero], 127 * np.asarray(scale)[nonzero],
                             rtol=1e-6)


def test_zero_vectors_get_a_safe_scale():
  q, scale = quantize_kv(jnp.zeros((2, 3, 8)))
  np.testing.assert_array_equal(q, 0)
  np.testing.assert_array_equal(scale, 1.0)  # not 0 (no 0 / 0) and not NaN
  np.testing.assert_array_equal(dequantize_kv(q, scale), 0.0)
  assert dequantize_kv(q, scale, jnp.bfloat16).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# Cache structure and single-layer attention.


def _random_kv(batch, t, seed):
  rng = np.random.default_rng(seed)
  k, v = (jnp.asarray(rng.normal(size=(batch, t, CFG.n_kv_heads, CFG.head_dim)), jnp.float32)
          for _ in "kv")
  return k, v


def test_int8_cache_layout_and_float_cache_unchanged():
  cache = KVCache.init(CFG, batch=3, max_len=10, dtype=jnp.int8)
  assert cache.quantized and len(cache.k_scales) == len(cache.v_scales) == CFG.n_layers
  # Every layer's codes [B, K, S, H] int8 and scales [B, K, S] float32, for K and for V.
  chex.assert_type(cache.k + cache.v, jnp.int8)
  chex.assert_shape(cache.k + cache.v, (3, CFG.n_kv_heads, 10, CFG.head_dim))
  chex.assert_type(cache.k_scales + cache.v_scales, jnp.float32)
  chex.assert_shape(cache.k_scales + cache.v_scales, (3, CFG.n_kv_heads, 10))
  float_cache = KVCache.init(CFG, batch=3, max_len=10)
  assert not float_cache.quantized and float_cache.k_scales == float_cache.v_scales == ()
  assert len(jax.tree.leaves(float_cache)) == 2 * CFG.n_layers  # no extra leaves
  paged = PagedKVCache.init(CFG, num_pages=5, page_size=4, batch=2, max_pages_per_seq=3,
                            dtype=jnp.int8)
  assert paged.quantized
  chex.assert_type(paged.k_pages + paged.v_pages, jnp.int8)
  chex.assert_shape(paged.k_pages + paged.v_pages, (CFG.n_kv_heads, 5, 4, CFG.head_dim))
  chex.assert_type(paged.k_scales + paged.v_scales, jnp.float32)
  chex.assert_shape(paged.k_scales + paged.v_scales, (CFG.n_kv_heads, 5, 4))  # [K, P, S_page]
  assert not PagedKVCache.init(CFG, 5, 4, 2, 3).quantized


def test_contiguous_int8_attention_close_to_float():
  batch, t = 2, 9
  k, v = _random_kv(batch, t, seed=0)
  q = jnp.asarray(np.random.default_rng(1).normal(size=(batch, t, CFG.n_heads, CFG.head_dim)),
                  jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
  outs = {}
  for dtype in (jnp.float32, jnp.int8):
    cache = KVCache.init(CFG, batch, 12, dtype).write(0, k, v, positions)
    outs[dtype] = np.asarray(cache.attend(0, q, positions))
  assert outs[jnp.int8].dtype == np.float32
  np.testing.assert_allclose(outs[jnp.int8], outs[jnp.float32], atol=ATTENTION_ATOL)
  assert not np.array_equal(outs[jnp.int8], outs[jnp.float32])  # it really was quantized
  bf16_out = KVCache.init(CFG, batch, 12, jnp.int8).write(0, k, v, positions).attend(
      0, q.astype(jnp.bfloat16), positions)
  assert bf16_out.dtype == jnp.bfloat16  # a bfloat16 model stays bfloat16


def test_paged_int8_keys_values_equal_contiguous_int8():
  """Same quantizer, so the paged view dequantizes to the contiguous cache's values exactly."""
  batch, t, page_size = 2, 7, 4
  k, v = _random_kv(batch, t, seed=2)
  positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
  dense = KVCache.init(CFG, batch, 8, jnp.int8).write(1, k, v, positions)
  paged = PagedKVCache.init(CFG, num_pages=6, page_size=page_size, batch=batch,
                            max_pages_per_seq=2, dtype=jnp.int8)
  paged = paged.with_page_tables([[4, 1], [0, 5]], [0, 0]).write(1, k, v, positions)
  for got, want in zip(paged.keys_values(1)[:2], dense.keys_values(1)[:2]):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got)[:, :, :t], np.asarray(want)[:, :, :t])
    np.testing.assert_array_equal(np.asarray(got)[:, :, t:], 0.0)  # past the length


def test_copy_pages_copies_scales():
  k, v = _random_kv(1, 4, seed=3)
  paged = PagedKVCache.init(CFG, num_pages=3, page_size=4, batch=1, max_pages_per_seq=1,
                            dtype=jnp.int8)
  paged = paged.with_page_tables([[0]], [0]).write(0, k, v, jnp.arange(4)[None])
  copied = paged.copy_pages([0], [2])
  for pools in (copied.k_pages, copied.v_pages, copied.k_scales, copied.v_scales):
    np.testing.assert_array_equal(pools[0][:, 2], pools[0][:, 0])
  view = copied.with_page_tables([[2]], [4]).keys_values(0)
  np.testing.assert_array_equal(view[0], paged.keys_values(0)[0])


def test_row_gathers_move_codes_and_scales_together():
  """generate's `x[rows]` tree map and beam search's reordering work on an int8 cache."""
  batch, t = 3, 5
  k, v = _random_kv(batch, t, seed=4)
  positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
  cache = KVCache.init(CFG, batch, 6, jnp.int8).write(0, k, v, positions)
  rows = jnp.asarray([2, 2, 0])
  gathered = jax.tree.map(lambda x: x[rows], cache)
  want = KVCache.init(CFG, 3, 6, jnp.int8).write(0, k[rows], v[rows], positions)
  for got_x, want_x in zip(jax.tree.leaves(gathered), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got_x, want_x)
  repeated = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), cache)  # beam search's prefill
  reordered = beam_search._reorder(repeated, jnp.asarray([[1, 1], [0, 1], [1, 0]]))
  np.testing.assert_array_equal(reordered.keys_values(0)[0][4], cache.keys_values(0)[0][2])
  np.testing.assert_array_equal(reordered.k_scales[0][0], cache.k_scales[0][0])


# ----------------------------------------------------------------------------------------------
# The model through int8 caches.


def _rollout(params, cache, prompt_BxT, steps):
  """Greedy: prefill, then `steps` one-token steps; returns (tokens [B, steps], logits)."""
  b, t = prompt_BxT.shape
  logits, cache = _forward(params, CFG, prompt_BxT, jnp.broadcast_to(jnp.arange(t), (b, t)),
                           cache)
  token_B, tokens, all_logits = jnp.argmax(logits[:, -1], -1), [], []
  for i in range(steps):
    tokens.append(token_B)
    logits, cache = _forward(params, CFG, token_B[:, None], jnp.full((b, 1), t + i), cache)
    all_logits.append(logits[:, 0])
    token_B = jnp.argmax(logits[:, 0], -1)
  return np.stack(tokens, 1), np.stack(all_logits, 1)


def test_int8_greedy_tokens_match_float_cache(tiny_model):
  """Measured: identical tokens on all 4 x 24 steps, logits within 2e-3 of the float cache's."""
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 12)), jnp.int32)
  runs = {dtype: _rollout(tiny_model.params, KVCache.init(CFG, 4, 12 + 24, dtype), prompt, 24)
          for dtype in (jnp.float32, jnp.int8)}
  (float_tokens, float_logits), (int8_tokens, int8_logits) = runs[jnp.float32], runs[jnp.int8]
  np.testing.assert_array_equal(int8_tokens, float_tokens)
  np.testing.assert_allclose(int8_logits, float_logits, atol=5e-3)


@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
def test_paged_int8_decode_equals_contiguous_int8(tiny_model, attention_impl):
  """Paged int8 (gather path or the int8 Pallas kernel) gives the contiguous int8 cache's tokens.

  Unused pool slots hold NaN scales and random codes: a stray read would show in the logits.
  The gather path does the contiguous cache's arithmetic: logits equal bit for bit. The kernel
  scales logits instead of keys, a float32 rounding apart (1e-7 per layer), which can move a
  later layer's K/V across an int8 rounding boundary: measured logit differences up to 2.4e-4.
  """
  batch, t, steps, page_size = 2, 6, 8, 4
  max_pages = pages_for(t + steps, page_size)
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 256, (batch, t)), jnp.int32)
  want_tokens, want_logits = _rollout(
      tiny_model.params, KVCache.init(CFG, batch, max_pages * page_size, jnp.int8), prompt, steps)
  num_pages = batch * max_pages + 2  # two pages stay unused
  tables_BxM = np.random.default_rng(2).permutation(num_pages)[:batch * max_pages].reshape(
      batch, max_pages)
  paged = PagedKVCache.init(CFG, num_pages, page_size, batch, max_pages, dtype=jnp.int8,
                            attention_impl=attention_impl)
  garbage = lambda x: jnp.full_like(x, jnp.nan if x.dtype == jnp.float32 else -77)
  paged = paged.replace(k_pages=jax.tree.map(garbage, paged.k_pages),
                        v_pages=jax.tree.map(garbage, paged.v_pages),
                        k_scales=jax.tree.map(garbage, paged.k_scales),
                        v_scales=jax.tree.map(garbage, paged.v_scales))
  paged = paged.with_page_tables(tables_BxM, [0] * batch)
  got_tokens, got_logits = _rollout(tiny_model.params, paged, prompt, steps)
  assert np.isfinite(got_logits).all()
  np.testing.assert_array_equal(got_tokens, want_tokens)
  if attention_impl == "xla":
    np.testing.assert_array_equal(got_logits, want_logits)
  else:
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Every decoding strategy honours Model.kv_cache_dtype.


def test_beam_search_and_speculative_decode_through_int8_caches(tiny_model, monkeypatch):
  import dataclasses

  import jinfer
  int8_model = dataclasses.replace(tiny_model, kv_cache_dtype="int8")
  created = []
  init = KVCache.init.__func__
  monkeypatch.setattr(KVCache, "init", classmethod(
      lambda cls, *args, **kw: created.append(init(cls, *args, **kw)) or created[-1]))
  beam = jinfer.BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
  got = jinfer.beam_search(int8_model, ["hi there"], beam)
  assert created and all(cache.quantized for cache in created)
  want = jinfer.beam_search(tiny_model, ["hi there"], beam)
  assert [s.token_ids for s in got[0]] == [s.token_ids for s in want[0]]

  created.clear()
  params = jinfer.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  spec = jinfer.SpeculativeConfig("self", 2, draft_layers=1)
  got = jinfer.generate(int8_model, ["hi there"], params, speculative=spec)
  assert len(created) == 2 and all(cache.quantized for cache in created)  # target and draft
  want = jinfer.generate(int8_model, ["hi there"], params)
  assert got[0].token_ids == want[0].token_ids  # speculative greedy == plain greedy
