"""Bad input gets an InvalidRequestError naming the field before any work; nothing is coerced.

Every case here was once found by fuzzing: run as a wrong result or crashing inside JAX.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer import SamplingParams, validation
from jinfer.decoding import sampling
from jinfer.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def _raises(fn, *words):
  with pytest.raises(InvalidRequestError) as info:
    fn()
  for word in words:
    assert word in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_k=2.5), ["top_k", "integer"]),
    (dict(top_k=-2), ["top_k"]),
    (dict(ignore_eos="no"), ["ignore_eos", "True or False"]),
    (dict(ignore_eos=1), ["ignore_eos"]),
    (dict(temperature=math.inf), ["temperature", "finite"]),
    (dict(temperature=math.nan), ["temperature"]),
    (dict(temperature="0.5"), ["temperature"]),
    (dict(top_p=math.nan), ["top_p"]),
    (dict(repetition_penalty=math.inf), ["repetition_penalty"]),
    (dict(frequency_penalty=True), ["frequency_penalty"]),
    (dict(n=True), ["n "]),
    (dict(max_tokens=4.0), ["max_tokens"]),
    (dict(logprobs=21), ["logprobs", "[0, 20]"]),
    (dict(seed=1.5), ["seed", "integer"]),
    (dict(seed="7"), ["seed"]),
    (dict(stop_token_ids=[1.7]), ["stop_token_ids", "1.7"]),
    (dict(stop_token_ids=[True]), ["stop_token_ids"]),
    (dict(stop_token_ids="2"), ["stop_token_ids"]),
    (dict(allowed_token_ids=[3, 4.5]), ["allowed_token_ids"]),
    (dict(allowed_token_ids=[]), ["allowed_token_ids", "empty"]),
    (dict(stop=["ok", ""]), ["stop[1]", "empty"]),
    (dict(stop=[3]), ["stop[0]", "string"]),
    (dict(bad_words=["\ud800"]), ["bad_words[0]", "Unicode"]),
    (dict(stop="a\udfffb"), ["stop[0]", "Unicode"]),
    (dict(logit_bias={"a": 1}), ["logit_bias key", "'a'"]),
    (dict(logit_bias={True: 1}), ["logit_bias key"]),
    (dict(logit_bias=[(1, 2)]), ["logit_bias", "dict"]),
    (dict(logprobs_mode="raw "), ["logprobs_mode"]),
])
def test_sampling_params_reject_wrong_types(kwargs, words):
  _raises(lambda: SamplingParams(**kwargs), *words)


@pytest.mark.parametrize("bias", [math.inf, -math.inf, math.nan, 1e39, 100.5, -101])
def test_logit_bias_is_a_finite_number_in_openai_range(bias):
  _raises(lambda: SamplingParams(logit_bias={100: bias}), "logit_bias[100]", "[-100.0, 100.0]")


def test_numpy_values_are_accepted_as_python_values():
  p = SamplingParams(top_k=np.int64(5), temperature=np.float32(0.5), seed=np.uint32(3),
                     stop_token_ids=np.array([1, 2]), logit_bias={np.int32(7): np.float64(2)})
  assert p.top_k == 5 and type(p.top_k) is int and p.temperature == 0.5
  assert p.stop_token_ids == (1, 2) and p.logit_bias == {7: 2.0} and p.seed == 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_max_logit_bias_forces_the_token_greedy_and_sampled(tiny_model, temperature):
  """+100 (the largest accepted) wins on both paths; inf once sampled token 0 (softmax NaNs)."""
  p = SamplingParams(temperature=temperature, max_tokens=4, seed=0, ignore_eos=True,
                     logit_bias={100: 100.0})
  assert jinfer.generate(tiny_model, ["xyz"], p)[0].token_ids == [100] * 4


def test_min_logit_bias_bans_the_token(tiny_model):
  free = jinfer.generate(tiny_model, ["xyz"], GREEDY)[0].token_ids
  p = SamplingParams(temperature=0, max_tokens=4, logit_bias={free[0]: -100.0})
  assert jinfer.generate(tiny_model, ["xyz"], p)[0].token_ids[0] != free[0]


# ----------------------------------------------------------------------------- seeds


def test_any_integer_seed_is_accepted_and_folded_modulo_2_64(tiny_model):
  def sample(seed):
    p = SamplingParams(temperature=1.0, max_tokens=6, seed=seed, ignore_eos=True)
    return jinfer.generate(tiny_model, ["seed"], p)[0].token_ids

  assert sample(-1) == sample(2**64 - 1)
  assert sample(2**70 + 5) == sample(5)
  different = {tuple(sample(s)) for s in (0, 2**32, 2**33, -1)}
  assert len(different) == 4


def test_seeds_below_2_32_keep_their_keys():
  keys = sampling.seed_keys([0, 5, 2**32 - 1])
  expected = jax.vmap(jax.random.key)(jnp.asarray([0, 5, 2**32 - 1], jnp.uint32))
  np.testing.assert_array_equal(jax.random.key_data(keys), jax.random.key_data(expected))


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompts, words", [
    ([[1.7, 2.9]], ["prompt 0", "not integers"]),
    ([[True, False]], ["prompt 0"]),
    ([b"hello"], ["prompt 0"]),
    ([[1, 2], [3, "4"]], ["prompt 1"]),
    ([[300]], ["prompt 0", "outside the vocabulary [0, 256)"]),
    ([[-1]], ["prompt 0", "outside"]),
    ([[]], ["prompt 0", "empty"]),
    (["ok", "\ud800"], ["prompt 1", "Unicode"]),
    ([], ["prompts is empty"]),
    ("hello", ["wrap a single prompt"]),
    ([1, 2, 3], ["wrap a single prompt"]),
    (np.array([1, 2, 3]), ["numpy array"]),
    (np.array([[1.5, 2.5]]), ["prompt 0"]),
    ({"prompt": "x"}, ["prompts must be a list"]),
])
def test_bad_prompts_are_named(tiny_model, prompts, words):
  _raises(lambda: jinfer.generate(tiny_model, prompts, GREEDY), *words)
  _raises(lambda: jinfer.generate_stream(tiny_model, prompts, GREEDY), *words)
  _raises(lambda: jinfer.beam_search(tiny_model, prompts, jinfer.BeamSearchParams(2, 3)), *words)


def test_numpy_prompts_equal_list_prompts(tiny_model):
  rows = [[10, 20, 30], [40, 50, 60]]
  from_list = jinfer.generate(tiny_model, rows, GREEDY)
  from_array = jinfer.generate(tiny_model, np.array(rows, np.int32), GREEDY)
  from_rows = jinfer.generate(tiny_model, [np.array(r) for r in rows], GREEDY)
  assert ([c.token_ids for c in from_list] == [c.token_ids for c in from_array]
          == [c.token_ids for c in from_rows])
  strings = jinfer.generate(tiny_model, np.array(["ab", "cd"]), GREEDY)
  assert [c.prompt_token_ids for c in strings] == [[97, 98], [99, 100]]


@pytest.mark.parametrize("params, words", [
    ({"temperature": 0}, ["SamplingParams", "dict"]),
    ([GREEDY, {"temperature": 0}], ["SamplingParams"]),
    ([GREEDY, GREEDY], ["2 SamplingParams for 1 prompts"]),
])
def test_params_must_be_sampling_params(tiny_model, params, words):
  _raises(lambda: jinfer.generate(tiny_model, ["x"], params), *words)


def test_token_ids_outside_the_vocabulary_are_named_at_generate(tiny_model):
  _raises(lambda: jinfer.generate(tiny_model, ["x"], SamplingParams(logit_bias={300: 1})),
          "logit_bias keys", "300")
  _raises(lambda: jinfer.generate(tiny_model, ["x"], SamplingParams(stop_token_ids=[256])),
          "stop_token_ids", "256")


def test_a_stream_refuses_a_bad_request_when_called(tiny_model):
  with pytest.raises(InvalidRequestError):
    jinfer.generate_stream(tiny_model, [[1.5]])  # not iterated: the call itself raises


# ----------------------------------------------------------------------------- logits, perplexity


@pytest.mark.parametrize("token_ids, words", [
    ([[256]], ["token_ids[0]", "outside the vocabulary"]),
    ([[-1]], ["token_ids[0]", "outside"]),
    ([[]], ["token_ids[0]", "empty"]),
    ([], ["token_ids is empty"]),
    ([[1, 2], [3]], ["different lengths"]),
    ([[1.5, 2]], ["token_ids[0]", "not integers"]),
    ([1, 2, 3], ["token_ids must be a list of token-id lists"]),
    (np.zeros((1, 2), np.float32), ["integer token ids", "float32"]),
    (np.zeros((2,), np.int32), ["[batch, length]"]),
])
def test_logits_validate_token_ids(tiny_model, token_ids, words):
  _raises(lambda: tiny_model.logits(token_ids), *words)


def test_logits_refuse_more_than_the_context(tiny_model):
  too_long = [[1] * (tiny_model.config.max_seq_len + 1)]
  _raises(lambda: tiny_model.logits(too_long), "context")


def test_logits_take_arrays_and_lists_alike(tiny_model):
  from_list = tiny_model.logits([[1, 2, 3]])
  from_array = tiny_model.logits(np.array([[1, 2, 3]], np.int64))
  from_jax = tiny_model.logits(jnp.array([[1, 2, 3]]))
  np.testing.assert_array_equal(from_list, from_array)
  np.testing.assert_array_equal(from_list, from_jax)


@pytest.mark.parametrize("kwargs, words", [
    (dict(token_ids=[1, 2, 256, 3]), ["token_ids", "outside"]),
    (dict(token_ids=[1, 2.5]), ["token_ids", "not integers"]),
    (dict(token_ids=[1]), ["at least 2 tokens"]),
    (dict(text="a\ud800"), ["text", "Unicode"]),
    (dict(text="ab", token_ids=[1, 2]), ["not both"]),
    (dict(text="abc", chunk_size=0), ["chunk_size"]),
    (dict(text="abc", chunk_size=2.0), ["chunk_size"]),
])
def test_perplexity_validates_its_input(tiny_model, kwargs, words):
  _raises(lambda: jinfer.perplexity(tiny_model, **kwargs), *words)


def test_perplexity_of_token_ids_is_finite(tiny_model):
  assert math.isfinite(jinfer.perplexity(tiny_model, token_ids=[1, 2, 255, 3]))


# ----------------------------------------------------------------------------- load_model


@pytest.mark.parametrize("kwargs, words", [
    (dict(dtype=jnp.int8), ["dtype", "int8", "bfloat16"]),
    (dict(dtype=jnp.float16), ["dtype", "float16"]),
    (dict(dtype="float64"), ["dtype"]),
    (dict(dtype=object()), ["dtype"]),
    (dict(quantize="int3"), ["quantize", "int3"]),
    (dict(kv_cache_dtype="fp8"), ["kv_cache_dtype", "fp8"]),
    (dict(attention_impl="flash"), ["attention_impl", "flash"]),
    (dict(page_size=0), ["page_size"]),
    (dict(page_size=True), ["page_size"]),
])
def test_load_model_checks_arguments_before_loading(kwargs, words):
  # The model name does not exist: the argument is refused before the name is even looked up.
  _raises(lambda: jinfer.load_model("no-such-model", **kwargs), *words)


def test_load_model_refuses_a_name_that_is_not_a_string():
  _raises(lambda: jinfer.load_model(42), "name_or_path")


def test_dtype_objects_that_are_supported_resolve():
  from jinfer.model import resolve_dtype
  assert resolve_dtype(jnp.bfloat16) == jnp.bfloat16
  assert resolve_dtype(np.dtype("float32")) == jnp.float32


# ----------------------------------------------------------------------------- validation itself


def test_integer_and_number_checks_name_the_range():
  assert validation.integer("k", 3, low=1, high=5) == 3
  _raises(lambda: validation.integer("k", 6, low=1, high=5), "k must be an integer in [1, 5]")
  _raises(lambda: validation.number("p", 0, low=0, high=1, low_open=True), "p", "(0, 1]")
  assert validation.number("p", np.float16(0.5), low=0) == 0.5


# ----------------------------------------------------------------------------- found by fuzzing


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=2**2000), ["temperature", "finite"]),
    (dict(logit_bias={1: 2**2000}), ["logit_bias[1]"]),
    (dict(n=129), ["n must be an integer in [1, 128]"]),
])
def test_huge_values_are_refused(kwargs, words):
  _raises(lambda: SamplingParams(**kwargs), *words)


def test_huge_beam_width_is_refused():
  _raises(lambda: jinfer.BeamSearchParams(beam_width=2**40, max_tokens=2), "beam_width", "128")


def test_top_k_above_the_vocabulary_keeps_every_token(tiny_model):
  def sample(top_k):
    p = SamplingParams(temperature=1.0, top_k=top_k, seed=3, max_tokens=5, ignore_eos=True)
    return jinfer.generate(tiny_model, ["k"], p)[0].token_ids

  assert sample(2**31) == sample(2**70) == sample(0)


def test_a_top_p_that_underflows_float32_still_keeps_the_top_token(tiny_model):
  greedy = jinfer.generate(tiny_model, ["p"], SamplingParams(temperature=0, max_tokens=4,
                                                             ignore_eos=True))[0]
  for seed in (0, 1):
    p = SamplingParams(temperature=1.0, top_p=1e-50, seed=seed, max_tokens=4, ignore_eos=True,
                       logprobs=1, logprobs_mode="processed")
    out = jinfer.generate(tiny_model, ["p"], p)[0]
    assert out.token_ids == greedy.token_ids
    assert all(math.isfinite(x) for x in out.logprobs)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "8", None])
def test_steps_per_chunk_is_a_positive_integer(tiny_model, steps):
  _raises(lambda: jinfer.generate_stream(tiny_model, ["x"], GREEDY, steps_per_chunk=steps),
          "steps_per_chunk")


def test_steps_per_chunk_past_the_output_is_one_chunk(tiny_model):
  deltas = list(jinfer.generate_stream(tiny_model, ["x"], GREEDY, steps_per_chunk=2**70))
  assert sum(len(d.token_ids) for d in deltas) == 4


@pytest.mark.parametrize("model", [None, "smollm2-135m-instruct", {}])
def test_model_must_be_a_model(model):
  _raises(lambda: jinfer.generate(model, ["x"]), "jinfer.Model")
  _raises(lambda: jinfer.beam_search(model, ["x"], jinfer.BeamSearchParams(2, 2)), "jinfer.Model")
  _raises(lambda: jinfer.perplexity(model, "some text"), "jinfer.Model")


def test_speculative_settings_are_checked_whatever_the_method(tiny_model):
  import types
  _raises(lambda: jinfer.SpeculativeConfig(method="self", draft_layers=1, ngram_max=[3]),
          "ngram_max")
  _raises(lambda: jinfer.SpeculativeConfig(method="draft_model",
                                           draft_model=types.SimpleNamespace(params={})),
          "jinfer.Model")


def test_string_fields_take_numpy_strings():
  p = SamplingParams(stop=np.array("a"), bad_words=np.array(["b"]))
  assert p.stop == ("a",) and p.bad_words == ("b",)
  assert type(p.bad_words[0]) is str


def test_jax_arrays_are_token_ids(tiny_model):
  rows = [[10, 20, 30]]
  expected = jinfer.generate(tiny_model, rows, GREEDY)[0].token_ids
  assert jinfer.generate(tiny_model, jnp.array(rows), GREEDY)[0].token_ids == expected
  assert jinfer.generate(tiny_model, [jnp.array(rows[0])], GREEDY)[0].token_ids == expected
  p = SamplingParams(stop_token_ids=jnp.array([5]), allowed_token_ids=np.array([1, 2]))
  assert p.stop_token_ids == (5,) and p.allowed_token_ids == (1, 2)


def test_load_model_refuses_odd_names_cleanly():
  for name in ("", "x" * 5000, "~nosuchuser-jinfer/x.gguf"):
    with pytest.raises(jinfer.JinferError):
      jinfer.load_model(name)
