"""attention_impl="pallas": generate over a paged KV cache with the Pallas decode kernel.

On CPU the kernel runs in interpret mode; it must give the tokens and logprobs of "xla".
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.cache.page_allocator import pages_for
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.decoding import programs
from jinfer.decoding import requests as requests_lib
from jinfer.errors import InvalidRequestError
from jinfer.model import resolve_attention_impl
from jinfer.models import config as config_lib

PROMPTS = [[1, 2, 3], list(range(10, 30)), [7]]  # ragged; the middle one spans two pages


@pytest.fixture(scope="module")
def pallas_model(tiny_model):
  return dataclasses.replace(tiny_model, attention_impl="pallas")


def test_pallas_generate_matches_xla(tiny_model, pallas_model):
  params = jinfer.SamplingParams(n=2, max_tokens=20, temperature=0.0, ignore_eos=True,
                                 logprobs=2)
  want = jinfer.generate(tiny_model, PROMPTS, params)
  got = jinfer.generate(pallas_model, PROMPTS, params)
  assert len(got) == len(want) == 2 * len(PROMPTS)
  for g, w in zip(got, want):
    assert g.token_ids == w.token_ids
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    for g_top, w_top in zip(g.top_logprobs, w.top_logprobs):
      assert g_top.keys() == w_top.keys()
      np.testing.assert_allclose(list(g_top.values()), list(w_top.values()), atol=1e-4)


def test_pallas_decode_step_runs_the_kernel(pallas_model):
  """A one-token step through a pallas PagedKVCache lowers to a pallas_call (no gather path)."""
  cfg = pallas_model.config
  cache = PagedKVCache.init(cfg, num_pages=4, page_size=16, batch=2, max_pages_per_seq=2,
                            attention_impl="pallas")
  cache = cache.with_page_tables([[0, 1], [2, 3]], [5, 17])
  step = programs.decode_step_fn(pallas_model.params, cfg)
  jaxpr = jax.make_jaxpr(step)(jnp.array([1, 2]), jnp.array([5, 17]), cache)
  assert "pallas_call" in str(jaxpr)
  xla_cache = cache.replace(attention_impl="xla")
  assert "pallas_call" not in str(jax.make_jaxpr(step)(jnp.array([1, 2]), jnp.array([5, 17]),
                                                       xla_cache))


def test_pallas_rows_never_write_a_shared_page(pallas_model):
  """Pages a row's decode writes (from its prompt's last, partial page on) are its alone."""
  params = jinfer.SamplingParams(n=2, max_tokens=4)
  b = requests_lib.prepare_batch(pallas_model, PROMPTS, params)
  page_size, tables_BxM = pallas_model.page_size, b.pages.tables_BxM
  used = tables_BxM[tables_BxM >= 0].tolist()
  for row, prompt in enumerate(b.row_prompt_B[:len(b.rows)]):
    first = len(PROMPTS[prompt]) // page_size
    last = pages_for(len(PROMPTS[prompt]) + params.max_tokens, page_size)
    assert all(used.count(page) == 1 for page in tables_BxM[row, first:last].tolist())
  assert (b.pages.prompt_tables_PxM[len(PROMPTS):] == -1).all()  # padding prompts write nowhere


def test_xla_is_default_and_unpaged(tiny_model):
  assert tiny_model.attention_impl == "xla"
  b = requests_lib.prepare_batch(tiny_model, PROMPTS, jinfer.SamplingParams(max_tokens=4))
  assert b.pages is None


def test_auto_resolves_to_xla_on_cpu():
  assert jax.default_backend() == "cpu"
  assert resolve_attention_impl("auto") == "xla"
  assert resolve_attention_impl("pallas") == "pallas"


@pytest.mark.parametrize("platform,head_dim,page_size,kv,want", [
    ("tpu", 128, 16, "auto", "pallas"), ("tpu", 64, 16, "auto", "xla"),  # SmolLM2's 64 lanes
    ("tpu", 128, 16, "int8", "xla"), ("tpu", 128, 32, "int8", "pallas"),
    ("gpu", 64, 16, "auto", "pallas"), ("gpu", 96, 16, "auto", "xla"),
    ("gpu", 64, 12, "auto", "xla"), ("cpu", 128, 16, "auto", "xla")])
def test_auto_picks_the_kernels_only_where_they_compile(monkeypatch, platform, head_dim,
                                                        page_size, kv, want):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  config = dataclasses.replace(config_lib.TINY_GQA, head_dim=head_dim)
  assert resolve_attention_impl("auto", config, page_size, kv) == want


@pytest.mark.slow
def test_load_model_auto_is_xla_on_cpu(smollm2_gguf_path):
  assert jinfer.load_model(str(smollm2_gguf_path), attention_impl="auto").attention_impl == "xla"
  assert jinfer.load_model(str(smollm2_gguf_path),
                           attention_impl="pallas").attention_impl == "pallas"


def test_bad_attention_impl_is_rejected(tiny_model):
  with pytest.raises(InvalidRequestError, match=r"attention_impl must be one of \['xla', 'pallas'\], got 'flash'"):
    dataclasses.replace(tiny_model, attention_impl="flash")
  with pytest.raises(InvalidRequestError, match=r"attention_impl must be one of \['auto', 'xla', 'pallas'\], got 'flash'"):
    jinfer.load_model("no-such-model", attention_impl="flash")
  with pytest.raises(InvalidRequestError, match="'auto'"):
    jinfer.Model(tiny_model.config, tiny_model.params, tiny_model.tokenizer, attention_impl="auto")
