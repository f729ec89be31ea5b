"""The sampling loop and generate: exact tests with hand-made logits, and cache consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.decoding import loop
from jinfer.decoding.sampling import SamplingArrays, SamplingParams, filtered_logits, sample

VOCAB = 8


def _arrays(params, seeds=None, stop_ids=None, vocab=VOCAB):
  stop_ids = stop_ids if stop_ids is not None else [[]] * len(params)
  return SamplingArrays.from_params(params, seeds or [0] * len(params), stop_ids, vocab)


def _counting_model(tokens_B, positions_B, cache):
  """Hand-made logits: always predicts (previous token + 1) mod VOCAB; the cache counts calls."""
  logits = 10.0 * jax.nn.one_hot((tokens_B + 1) % VOCAB, VOCAB)
  return logits, cache + 1


def _run(first_tokens, max_tokens, stop_ids, num_steps=None, capacity=8, params=None):
  params = params or [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
  sampling = _arrays(params, stop_ids=stop_ids)
  batch = len(first_tokens)
  first_logits = 10.0 * jax.nn.one_hot(jnp.asarray(first_tokens), VOCAB)
  state = loop.init_state(jnp.int32(0), jnp.ones(batch, jnp.int32), jnp.zeros((batch, VOCAB), bool),
                          capacity, 0, first_logits, sampling, jnp.zeros(batch, bool))
  num_steps = capacity if num_steps is None else num_steps
  return loop.decode(_counting_model, state, sampling, jnp.int32(num_steps))


def test_loop_counts_up_and_stops_per_row():
  state = _run(first_tokens=[0, 3, 5], max_tokens=[3, 8, 8], stop_ids=[[], [6], []])
  np.testing.assert_array_equal(state.tokens_BxL, [
      [0, 1, 2, -1, -1, -1, -1, -1],  # max_tokens=3
      [3, 4, 5, 6, -1, -1, -1, -1],  # stop id 6 is kept as the last token
      [5, 6, 7, 0, 1, 2, 3, 4],  # runs to capacity
  ])
  np.testing.assert_array_equal(state.num_generated_B, [3, 4, 8])
  assert bool(state.done_B.all())
  assert int(state.cache) == 7  # one model call per token after the first


def test_loop_stops_early_when_all_rows_are_done():
  state = _run(first_tokens=[0, 0], max_tokens=[2, 3], stop_ids=[[], []])
  np.testing.assert_array_equal(state.num_generated_B, [2, 3])
  assert int(state.cache) == 2  # the loop ends with the last row, not at capacity


def test_loop_resumes_in_chunks_with_the_same_result():
  whole = _run(first_tokens=[2], max_tokens=[8], stop_ids=[[]])
  partial = _run(first_tokens=[2], max_tokens=[8], stop_ids=[[]], num_steps=2)
  assert int(partial.num_generated_B[0]) == 3 and int(partial.cache) == 2
  sampling = _arrays([SamplingParams(max_tokens=8, temperature=0.0)])
  resumed = loop.decode(_counting_model, partial, sampling, jnp.int32(8))
  np.testing.assert_array_equal(resumed.tokens_BxL, whole.tokens_BxL)


def test_filtered_logits_top_k_top_p_min_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4))
  params = [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.35),
            SamplingParams(top_k=4, top_p=0.6)]
  kept = np.isfinite(np.asarray(filtered_logits(logits, _arrays(params))))
  np.testing.assert_array_equal(kept, [
      [1, 1, 0, 0, 0],  # top-2
      [1, 1, 1, 0, 0],  # 0.5 + 0.2 < 0.8, so the third token is still needed
      [1, 1, 0, 0, 0],  # p >= 0.35 * 0.5
      [1, 1, 0, 0, 0],  # top-p 0.6 is tighter than top-4
  ])


def test_temperature_scales_logits_before_filtering():
  logits = jnp.asarray([[2.0, 1.0, 0.0]])
  out = filtered_logits(logits, _arrays([SamplingParams(temperature=0.5)]))
  np.testing.assert_allclose(out, [[4.0, 2.0, 0.0]])


def test_sampling_follows_the_tempered_distribution():
  """Chi-square test of 4000 draws (one row per seed) against softmax(logits / T)."""
  logits_V = jnp.asarray([1.0, 0.5, 0.0, -1.0])
  draws = 4000
  params = [SamplingParams(temperature=0.7)] * draws
  tokens = sample(jnp.broadcast_to(logits_V, (draws, 4)), _arrays(params, list(range(draws))),
                  jnp.int32(0))
  observed = np.bincount(np.asarray(tokens), minlength=4)
  expected = draws * np.asarray(jax.nn.softmax(logits_V / 0.7))
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert chi2 < 16.27, (observed, expected)  # p = 0.001 critical value for 3 degrees of freedom


def test_sampling_params_reject_bad_values():
  for bad, word in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                    (dict(top_k=-5), "top_k"), (dict(max_tokens=0), "max_tokens"),
                    (dict(min_p=2), "min_p"), (dict(seed="x"), "seed")]:
    with pytest.raises(jinfer.InvalidRequestError, match=word):
      SamplingParams(**bad)


# ----------------------------------------------------------------------------- generate


def _argmax_rollout(model, prompt_ids, steps):
  seq = list(prompt_ids)
  for _ in range(steps):
    seq.append(int(jnp.argmax(model.logits(np.asarray([seq]))[0, -1])))
  return seq[len(prompt_ids):]


def test_greedy_through_cache_equals_full_forward_rollout(tiny_model):
  prompts = ["a", "ragged lengths", "a prompt longer than sixteen tokens for bucketing"]
  greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
  for completion in jinfer.generate(tiny_model, prompts, greedy):
    assert completion.finish_reason == "length"
    assert completion.token_ids == _argmax_rollout(tiny_model, completion.prompt_token_ids, 12)


def test_seeded_samples_do_not_depend_on_batch_company(tiny_model):
  p = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
  alone = jinfer.generate(tiny_model, ["xyz"], p)[0].token_ids
  crowd = jinfer.generate(tiny_model, ["other", "another one", "xyz"],
                          [SamplingParams(seed=7), SamplingParams(temperature=0.0), p])
  assert crowd[2].token_ids == alone
  assert jinfer.generate(tiny_model, ["xyz"], p)[0].token_ids == alone


def test_stop_token_ids_and_per_prompt_max_tokens(tiny_model):
  first = jinfer.generate(tiny_model, ["hi"], SamplingParams(max_tokens=4, temperature=0.0))[0]
  stop_at = first.token_ids[1]
  outs = jinfer.generate(tiny_model, ["hi", "hi"], [
      SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=[stop_at]),
      SamplingParams(max_tokens=2, temperature=0.0)])
  assert outs[0].token_ids == first.token_ids[:2] and outs[0].finish_reason == "stop"
  assert outs[1].token_ids == first.token_ids[:2] and outs[1].finish_reason == "length"


def test_stream_concatenates_to_generate(tiny_model):
  prompts = ["stream me", "and me too, longer"]
  params = [SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)]
  expected = jinfer.generate(tiny_model, prompts, params)
  ids, texts, reasons = [[], []], ["", ""], [None, None]
  for delta in jinfer.generate_stream(tiny_model, prompts, params, steps_per_chunk=3):
    assert reasons[delta.index] is None, "no delta after the final one"
    ids[delta.index] += delta.token_ids
    texts[delta.index] += delta.text
    reasons[delta.index] = delta.finish_reason
  assert ids == [c.token_ids for c in expected]
  assert texts == [c.text for c in expected]
  assert reasons == ["length", "length"]


def test_generate_rejects_bad_requests(tiny_model):
  with pytest.raises(jinfer.InvalidRequestError, match="empty"):
    jinfer.generate(tiny_model, [""])
  with pytest.raises(jinfer.InvalidRequestError, match="wrap a single prompt"):
    jinfer.generate(tiny_model, "not a list")
  with pytest.raises(jinfer.InvalidRequestError, match="one per prompt"):
    jinfer.generate(tiny_model, ["a", "b"], [SamplingParams()] * 3)
  with pytest.raises(jinfer.InvalidRequestError, match="context"):
    jinfer.generate(tiny_model, ["a"], SamplingParams(max_tokens=10_000))
  with pytest.raises(jinfer.InvalidRequestError, match="outside"):
    jinfer.generate(tiny_model, [[1, 2, 999]])


def test_stream_delivers_every_chunk_without_stop_strings(tiny_model):
  """Deltas arrive every steps_per_chunk steps whether or not the request has stop strings."""
  params = jinfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  deltas = list(jinfer.generate_stream(tiny_model, [[1, 2]], params, steps_per_chunk=2))
  sizes = [len(d.token_ids) for d in deltas]
  assert sum(sizes) == 12 and max(sizes) <= 2 and len(sizes) >= 6, sizes
