"""Logits processors, stop rules, n samples and logprobs: exact and statistical tests."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.decoding import loop
from jinfer.decoding import sampling as sampling_lib
from jinfer.decoding.generate import generate_with_stats
from jinfer.decoding.sampling import (SamplingArrays, SamplingParams, bad_word_mask,
                                      filtered_logits, process_logits, sample)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
V = 8


def _arrays(params, stop_ids=None, seeds=None, vocab=V):
  return SamplingArrays.from_params(params, seeds or [0] * len(params),
                                    stop_ids or [[]] * len(params), vocab)


def _process(logits, params, counts=None, prompt_mask=None, generated=None, stop_ids=None):
  logits = jnp.asarray(logits, jnp.float32)
  b = logits.shape[0]
  counts = jnp.zeros((b, V), jnp.int32) if counts is None else jnp.asarray(counts)
  prompt_mask = jnp.zeros((b, V), bool) if prompt_mask is None else jnp.asarray(prompt_mask)
  generated = jnp.zeros((b,), jnp.int32) if generated is None else jnp.asarray(generated)
  s = _arrays(params, stop_ids)
  recent = jnp.full((b, s.bad_prefix_BxWxR.shape[-1]), -1, jnp.int32)
  return np.asarray(process_logits(logits, s, counts, prompt_mask, generated, recent))


def test_logit_bias_and_allowed_token_ids():
  logits = np.zeros((2, V))
  out = _process(logits, [SamplingParams(logit_bias={3: 2.5, 5: -1.0}),
                          SamplingParams(allowed_token_ids=[1, 6], logit_bias={6: 1.0})])
  np.testing.assert_array_equal(out[0], [0, 0, 0, 2.5, 0, -1.0, 0, 0])
  np.testing.assert_array_equal(out[1], [-np.inf, 0, -np.inf, -np.inf, -np.inf, -np.inf, 1.0,
                                         -np.inf])


@pytest.mark.parametrize("params,processes", [
    (SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3), False),
    (SamplingParams(repetition_penalty=1.2), True),
    (SamplingParams(presence_penalty=0.5), True),
    (SamplingParams(min_tokens=2, max_tokens=4), True),
    (SamplingParams(logit_bias={1: 1.0}), True),
    (SamplingParams(allowed_token_ids=[1, 2]), True),
])
def test_processors_are_skipped_only_when_no_row_uses_one(params, processes):
  """Decode steps skip the processors when no row of the batch uses one (sampling filters are
  not processors); one row using one turns them on for the batch, leaving the others' unchanged."""
  assert bool(_arrays([SamplingParams(), params]).processes_logits_B.any()) == processes
  logits = np.random.default_rng(0).standard_normal((2, V)).astype(np.float32)
  counts = np.zeros((2, V), np.int32)
  counts[:, 3] = 1
  rows = [SamplingParams(), params]
  out = _process(logits, rows, counts=counts, stop_ids=[[2], [2]])
  np.testing.assert_array_equal(out[0], logits[0])  # the plain row is untouched either way
  # Skipping never changes the result: it equals applying every processor unconditionally.
  s = _arrays(rows, stop_ids=[[2], [2]])
  always = sampling_lib._apply_processors(
      jnp.asarray(logits), s, jnp.asarray(counts), jnp.zeros((2, V), bool),
      jnp.zeros((2,), jnp.int32), jnp.full((2, s.bad_prefix_BxWxR.shape[-1]), -1, jnp.int32))
  np.testing.assert_array_equal(out, np.asarray(always))
  assert processes == (not np.array_equal(out[1], logits[1]))  # each case changes its row


def test_bad_word_mask_bans_the_last_token_after_its_prefix():
  s = SamplingArrays.from_params([SamplingParams()] * 2, [0, 0], [[], []], V,
                                 bad_word_ids=[[[3], [1, 2, 5]], [[4, 6]]])
  assert s.bad_prefix_BxWxR.shape == (2, 2, 2)
  recent = jnp.asarray([[1, 2], [0, 4]])
  mask = np.asarray(bad_word_mask(s, recent, V))
  assert np.flatnonzero(mask[0]).tolist() == [3, 5]  # 3 always; 5 after 1, 2
  assert np.flatnonzero(mask[1]).tolist() == [6]  # 6 after 4
  mask = np.asarray(bad_word_mask(s, jnp.asarray([[2, 1], [4, 0]]), V))
  assert np.flatnonzero(mask[0]).tolist() == [3] and not mask[1].any()


def test_bad_words_never_appear_in_the_output(tiny_model):
  ab = [ord("a"), ord("b")]
  free = jinfer.generate(tiny_model, ["xyz"], SamplingParams(
      max_tokens=24, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=ab))[0]
  assert "ab" in free.text  # the test would be empty otherwise
  out = jinfer.generate(tiny_model, ["xyz"], SamplingParams(
      max_tokens=24, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=ab,
      bad_words=["ab"]))[0]
  assert "ab" not in out.text and len(out.token_ids) == 24
  only_b = jinfer.generate(tiny_model, ["xyz"], SamplingParams(
      max_tokens=8, temperature=0, ignore_eos=True, allowed_token_ids=ab, bad_words="a"))[0]
  assert only_b.text == "b" * 8


def test_min_tokens_masks_stop_tokens_until_reached():
  logits = np.ones((2, V))
  out = _process(logits, [SamplingParams(min_tokens=3)] * 2, generated=[2, 3],
                 stop_ids=[[2, 7], [2, 7]])
  assert np.isneginf(out[0, [2, 7]]).all() and np.isfinite(np.delete(out[0], [2, 7])).all()
  assert np.isfinite(out[1]).all()


def test_frequency_and_presence_penalties_follow_openai():
  logits = np.full((1, V), 1.0)
  counts = np.asarray([[0, 1, 3, 0, 0, 0, 0, 0]])
  out = _process(logits, [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)],
                 counts=counts)
  np.testing.assert_allclose(out[0], 1.0 - 0.5 * counts[0] - 0.25 * (counts[0] > 0))


def test_repetition_penalty_equals_transformers():
  import torch
  from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, V)).astype(np.float32)
  prompt = [[1, 2], [4, 4]]
  generated = [[2, 5], [0]]
  counts = np.zeros((2, V), np.int32)
  prompt_mask = np.zeros((2, V), bool)
  for b in range(2):
    prompt_mask[b, prompt[b]] = True
    np.add.at(counts[b], generated[b], 1)
  out = _process(logits, [SamplingParams(repetition_penalty=1.3)] * 2, counts=counts,
                 prompt_mask=prompt_mask)
  for b in range(2):
    ids = torch.tensor([prompt[b] + generated[b]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.tensor(logits[b:b + 1]))
    np.testing.assert_allclose(out[b], expected[0].numpy(), rtol=1e-6)


def _counting_model(tokens_B, positions_B, cache):
  return 10.0 * jax.nn.one_hot((tokens_B + 1) % V, V), cache


def test_loop_with_min_tokens_does_not_stop_early():
  params = [SamplingParams(max_tokens=8, min_tokens=4, temperature=0.0)]
  sampling = _arrays(params, stop_ids=[[2]])
  first = 10.0 * jax.nn.one_hot(jnp.asarray([0]), V)
  state = loop.init_state(jnp.int32(0), jnp.ones(1, jnp.int32), jnp.zeros((1, V), bool), 8, 0,
                          first, sampling, jnp.zeros(1, bool))
  state = loop.decode(_counting_model, state, sampling, jnp.int32(8))
  # 2 is banned at steps 2 (argmax of the rest picks id 0); allowed from the 5th token on.
  assert np.asarray(state.tokens_BxL[0, :int(state.num_generated_B[0])]).tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("params,keep", [
    (SamplingParams(top_k=2), [0, 1]),
    (SamplingParams(top_p=0.75), [0, 1, 2]),
    (SamplingParams(min_p=0.6), [0, 1]),  # p >= 0.6 * 0.4
])
def test_filters_sample_the_renormalised_distribution(params, keep):
  """Chi-square over 4000 rows, each with its own seed."""
  probs = np.asarray([0.4, 0.3, 0.2, 0.1])
  draws = 4000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (draws, 4))
  s = _arrays([params] * draws, seeds=list(range(draws)), vocab=4)
  observed = np.bincount(np.asarray(sample(logits, s, jnp.int32(0))), minlength=4)
  assert observed[[i for i in range(4) if i not in keep]].sum() == 0
  expected = draws * probs[keep] / probs[keep].sum()
  chi2 = ((observed[keep] - expected) ** 2 / expected).sum()
  assert chi2 < {1: 10.83, 2: 13.82}[len(keep) - 1], (observed, expected)  # p = 0.001


# ----------------------------------------------------------------------------- through generate


def test_n_samples_share_the_prefill_and_differ(tiny_model):
  p = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
  outs, stats = generate_with_stats(tiny_model, ["shared prompt"], p)
  assert [o.index for o in outs] == [0, 1, 2]
  assert stats.prompt_tokens == len("shared prompt")  # prefilled once
  assert len({tuple(o.token_ids) for o in outs}) == 3
  single = jinfer.generate(tiny_model, ["shared prompt"],
                           SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True))
  assert outs[0].token_ids == single[0].token_ids
  greedy = jinfer.generate(tiny_model, ["a", "b"], SamplingParams(n=2, max_tokens=4, temperature=0))
  assert [o.prompt_token_ids for o in greedy] == [[97], [97], [98], [98]]
  assert greedy[0].token_ids == greedy[1].token_ids


def test_stop_strings_end_and_trim_the_text(tiny_model):
  letters = list(range(ord("a"), ord("z") + 1))  # allowed_token_ids keeps the text ASCII
  base = dict(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True, allowed_token_ids=letters)
  free = jinfer.generate(tiny_model, ["hello"], SamplingParams(**base))[0]
  assert set(free.token_ids) <= set(letters)
  raw = free.text
  cut = next(i for i in range(3, 20) if raw.find(raw[i:i + 2]) == i)  # first occurrence
  stop = raw[cut:cut + 2]
  p = SamplingParams(**base, stop=[stop, "never-there"])
  out = jinfer.generate(tiny_model, ["hello"], p)[0]
  assert out.text == raw[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
  assert out.token_ids == free.token_ids[:cut + 2]
  deltas = list(jinfer.generate_stream(tiny_model, ["hello"], p, steps_per_chunk=2))
  assert "".join(d.text for d in deltas) == raw[:cut]
  assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop


def test_stop_token_id_is_reported_as_stop_reason(tiny_model):
  free = jinfer.generate(tiny_model, ["xy"], SamplingParams(max_tokens=5, temperature=0))[0]
  out = jinfer.generate(tiny_model, ["xy"], SamplingParams(
      max_tokens=5, temperature=0, stop_token_ids=[free.token_ids[2]]))[0]
  assert out.token_ids == free.token_ids[:3] and out.stop_reason == free.token_ids[2]


def test_top_logprobs_raw_and_processed(tiny_model):
  raw = jinfer.generate(tiny_model, ["logprobs"],
                        SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
  seq = list(raw.prompt_token_ids)
  for t, token in enumerate(raw.token_ids):
    expected = jax.nn.log_softmax(tiny_model.logits(np.asarray([seq]))[0, -1])
    top3 = np.argsort(-np.asarray(expected))[:3]
    assert list(raw.top_logprobs[t]) == top3.tolist()
    np.testing.assert_allclose(list(raw.top_logprobs[t].values()), expected[top3], atol=1e-5)
    np.testing.assert_allclose(raw.logprobs[t], expected[token], atol=1e-5)
    seq.append(token)
  processed = jinfer.generate(tiny_model, ["logprobs"], SamplingParams(
      max_tokens=4, temperature=0.7, top_k=2, seed=0, logprobs=3, logprobs_mode="processed",
      ignore_eos=True))[0]
  for step in processed.top_logprobs:
    values = np.asarray(list(step.values()))
    assert np.isneginf(values[2]) and np.isclose(np.exp(values[:2]).sum(), 1.0, atol=1e-5)


def test_processors_validate_their_values(tiny_model):
  for bad, word in [(dict(n=0), "n must"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
                    (dict(repetition_penalty=0), "repetition_penalty"),
                    (dict(presence_penalty=3), "presence_penalty"), (dict(logprobs=99), "logprobs"),
                    (dict(logprobs_mode="x"), "logprobs_mode"), (dict(stop=[""]), "stop"),
                    (dict(allowed_token_ids=[]), "allowed_token_ids"),
                    (dict(bad_words=[" "]), "bad_words")]:
    with pytest.raises(jinfer.InvalidRequestError, match=word):
      SamplingParams(**bad)
  with pytest.raises(jinfer.InvalidRequestError, match="outside the vocabulary"):
    jinfer.generate(tiny_model, ["a"], SamplingParams(logit_bias={10_000: 1.0}))


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
    dict(temperature=1.3, top_k=6, top_p=0.7), dict(top_k=3, top_p=0.5, min_p=0.2),
    dict(temperature=0.5, top_p=0.95, min_p=0.05),
])
def test_filters_equal_transformers_warpers(settings):
  import torch
  from transformers.generation import logits_process as lp
  vocab = 32
  logits = np.random.default_rng(1).standard_normal((3, vocab)).astype(np.float32) * 2
  ours = np.asarray(filtered_logits(jnp.asarray(logits), _arrays(
      [SamplingParams(**settings)] * 3, vocab=vocab)))
  warpers = []  # transformers' order: temperature, top-k, top-p, min-p
  if "temperature" in settings:
    warpers.append(lp.TemperatureLogitsWarper(settings["temperature"]))
  if "top_k" in settings:
    warpers.append(lp.TopKLogitsWarper(settings["top_k"]))
  if "top_p" in settings:
    warpers.append(lp.TopPLogitsWarper(settings["top_p"]))
  if "min_p" in settings:
    warpers.append(lp.MinPLogitsWarper(settings["min_p"]))
  expected = torch.tensor(logits)
  for warper in warpers:
    expected = warper(None, expected)
  expected = expected.numpy()
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


def test_greedy_tokens_equal_argmax_including_ties_nan_and_inf():
  greedy_tokens = sampling_lib.greedy_tokens
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 2, 50)).astype(np.float32)
  logits[0, 0, [3, 17]] = 9.0  # a tie: the first index wins
  logits[1, 0, [5, 30]] = np.nan  # NaN counts as the maximum, the first one
  logits[2, 0] = -np.inf  # nothing finite: index 0
  logits[3, 1, 49] = np.inf
  logits[4, 1, :] = 1.0
  got = greedy_tokens(jnp.asarray(logits))
  assert got.dtype == jnp.int32 and got.shape == (6, 2)
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), axis=-1))
  np.testing.assert_array_equal(got[:5, 0], [3, 5, 0, np.argmax(logits[3, 0]), np.argmax(logits[4, 0])])
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  np.testing.assert_array_equal(greedy_tokens(bf16), jnp.argmax(bf16, axis=-1))
