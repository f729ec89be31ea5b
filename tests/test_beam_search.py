"""Beam search: exact tests with hand-made logits, equality with transformers on SmolLM2."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.decoding import beam_search as bs
from jinfer.buckets import bucket
from jinfer.decoding.sampling import SamplingParams

EOS = 0


# ----------------------------------------------------------------------------- hand-made logits


def _fake_tokens_to_logits(table_VxVxV, tokens_N, positions_N, history_NxS):
  """A second-order Markov model that reads the previous token from its cache.

  The cache is each row's token history, so a beam whose cache row is not its parent's sees the
  wrong previous token: the exhaustive test below then fails.
  """
  rows_N = jnp.arange(tokens_N.shape[0])
  history_NxS = history_NxS.at[rows_N, positions_N].set(tokens_N)
  previous_N = history_NxS[rows_N, positions_N - 1]
  return table_VxVxV[previous_N, tokens_N], history_NxS


def _run_fake(table_VxVxV, prompts, params, stop_ids=(EOS,)):
  """Beam search through `search` with the fake model; prompts have >= 2 tokens."""
  table = jnp.asarray(table_VxVxV, jnp.float32)
  batch, width = len(prompts), params.beam_width
  capacity = bucket(params.max_tokens)
  history_NxS = np.zeros((batch * width, max(map(len, prompts)) + capacity), np.int32)
  for b, ids in enumerate(prompts):
    history_NxS[b * width:(b + 1) * width, :len(ids)] = ids
  first_BxV = jnp.stack([table[ids[-2], ids[-1]] for ids in prompts])
  prompt_lens_B = jnp.asarray([len(ids) for ids in prompts], jnp.int32)
  settings = bs.BeamSettings.create(params, list(stop_ids), max(len(stop_ids), 1))
  state = bs.init_state(jnp.asarray(history_NxS), batch, width, capacity, jnp.ones(batch, bool))
  run = jax.jit(bs.search, static_argnums=(0, 5))
  state = run(functools.partial(_fake_tokens_to_logits, table), state, first_BxV, prompt_lens_B,
              settings, (1 + max(len(stop_ids), 1)) * width)
  return bs.results(_DigitTokenizer(), jax.device_get(state), batch, params, stop_ids)


class _DigitTokenizer:

  def decode(self, ids, skip_special_tokens=False):
    return "".join(map(str, ids))


def _table(probs_by_token: dict[int, list[float]], vocab: int) -> np.ndarray:
  """Log-probabilities [prev, cur, next] that depend on the current token only."""
  table = np.full((vocab, vocab), 1.0 / vocab)
  for token, probs in probs_by_token.items():
    table[token] = probs
  return np.broadcast_to(np.log(table)[None], (vocab, vocab, vocab))


def test_beam_search_beats_greedy():
  # From the prompt (last token 3): token 1 (0.5) or 2 (0.4); after 1 the best is 0.35, after 2
  # it is 0.9. Greedy takes 1, 1 (0.175); two beams find 2, 3 (0.36).
  table = _table({3: [0.05, 0.5, 0.4, 0.05], 1: [0.1, 0.35, 0.3, 0.25],
                  2: [0.02, 0.03, 0.05, 0.9]}, vocab=4)
  greedy, = _run_fake(table, [[1, 3]], bs.BeamSearchParams(beam_width=1, max_tokens=2))[0]
  assert greedy.token_ids == [1, 1]
  assert greedy.cumulative_logprob == pytest.approx(math.log(0.5 * 0.35), abs=1e-6)
  best, second = _run_fake(table, [[1, 3]], bs.BeamSearchParams(
      beam_width=2, max_tokens=2, num_return_sequences=2))[0]
  assert best.token_ids == [2, 3] and best.finish_reason == "length"
  assert best.cumulative_logprob == pytest.approx(math.log(0.4 * 0.9), abs=1e-6)
  assert best.score == pytest.approx(math.log(0.4 * 0.9) / 2, abs=1e-6)
  assert second.token_ids == [1, 1]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_length_penalty_decides_between_short_and_long(length_penalty):
  # Step 0: token 1 (0.5) runs on, EOS (0.45) finishes: [EOS], log 0.45, 1 token. Step 1: after 1,
  # EOS (0.8) finishes [1, EOS], log 0.4, 2 tokens. Two hypotheses fill the buffer: done.
  table = _table({3: [0.45, 0.5, 0.03, 0.02], 1: [0.8, 0.1, 0.06, 0.04]}, vocab=4)
  params = bs.BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=length_penalty,
                               early_stopping=True, num_return_sequences=2)
  hypotheses = _run_fake(table, [[1, 3]], params)[0]
  short = (math.log(0.45), [EOS])
  long = (math.log(0.4) / 2 ** length_penalty, [1, EOS])
  expected = [long, short] if length_penalty == 1.0 else [short, long]
  assert [h.token_ids for h in hypotheses] == [ids for _, ids in expected]
  assert [h.score for h in hypotheses] == pytest.approx([s for s, _ in expected], abs=1e-6)
  assert all(h.finish_reason == "stop" for h in hypotheses)


def _all_hypotheses(table_VxVxV, prompt, max_tokens, stop_ids, length_penalty):
  """Every sequence that ends in a stop token or at max_tokens, with its score, best first."""
  vocab = table_VxVxV.shape[0]
  log_probs = table_VxVxV - np.log(np.exp(table_VxVxV).sum(-1, keepdims=True))
  found = []

  def extend(seq, logprob):
    for token in range(vocab):
      total = logprob + log_probs[seq[-2], seq[-1], token]
      ids = seq[len(prompt):] + [token]
      if token in stop_ids or len(ids) == max_tokens:
        found.append((total / len(ids) ** length_penalty, ids))
      else:
        extend(seq + [token], total)

  extend(list(prompt), 0.0)
  return sorted(found, key=lambda x: -x[0])


@pytest.mark.parametrize("stop_ids,length_penalty,early_stopping", [
    ((EOS,), 1.0, True), ((EOS,), 0.0, False), ((EOS,), 2.0, "never"), ((EOS, 3), -0.5, False)])
def test_wide_beams_find_every_hypothesis_in_score_order(stop_ids, length_penalty,
                                                         early_stopping):
  # With W = the number of possible hypotheses, no candidate is ever crowded out: the buffer
  # ends holding all of them, ordered by transformers' score. Two ragged prompts share a batch.
  rng = np.random.default_rng(0)
  table = rng.normal(size=(4, 4, 4)) * 2
  prompts, max_tokens = [[1, 2], [3, 1, 1]], 3
  want = [_all_hypotheses(table, p, max_tokens, stop_ids, length_penalty) for p in prompts]
  width = len(want[0])
  assert width == {1: 40, 2: 22}[len(stop_ids)]
  params = bs.BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                               length_penalty=length_penalty, early_stopping=early_stopping,
                               num_return_sequences=width)
  for got, expected in zip(_run_fake(table, prompts, params, stop_ids), want):
    assert [h.token_ids for h in got] == [ids for _, ids in expected]
    np.testing.assert_allclose([h.score for h in got], [s for s, _ in expected], atol=1e-5)
    lengths = np.asarray([len(h.token_ids) for h in got], np.float64)
    np.testing.assert_allclose([h.cumulative_logprob for h in got],
                               [s for s, _ in expected] * lengths ** length_penalty, atol=1e-5)
    assert [h.finish_reason for h in got] == [
        "stop" if ids[-1] in stop_ids else "length" for _, ids in expected]


# ----------------------------------------------------------------------------- tiny model


def test_one_beam_is_greedy(tiny_model):
  prompts = ["one beam", "is greedy decoding"]
  greedy = jinfer.generate(tiny_model, prompts, SamplingParams(max_tokens=10, temperature=0.0))
  beams = jinfer.beam_search(tiny_model, prompts, jinfer.BeamSearchParams(
      beam_width=1, max_tokens=10, early_stopping=True))
  for completion, (hypothesis,) in zip(greedy, beams):
    assert hypothesis.token_ids == completion.token_ids
    assert hypothesis.cumulative_logprob == pytest.approx(sum(completion.logprobs), abs=1e-4)
    assert hypothesis.text == completion.text
    assert hypothesis.finish_reason == completion.finish_reason


def test_results_do_not_depend_on_batch_company(tiny_model):
  params = jinfer.BeamSearchParams(beam_width=3, max_tokens=6, num_return_sequences=3,
                                   stop_token_ids=[ord("e")])
  prompts = ["short", [104, 105], "a prompt longer than sixteen tokens for bucketing"]
  together = jinfer.beam_search(tiny_model, prompts, params)
  assert [len(hypotheses) for hypotheses in together] == [3, 3, 3]
  for prompt, hypotheses in zip(prompts, together):
    alone, = jinfer.beam_search(tiny_model, [prompt], params)
    assert [h.token_ids for h in alone] == [h.token_ids for h in hypotheses]
    np.testing.assert_allclose([h.score for h in alone], [h.score for h in hypotheses],
                               atol=1e-5)
    scores = [h.score for h in hypotheses]
    assert scores == sorted(scores, reverse=True)


def test_beam_search_params_reject_bad_values():
  for bad, word in [(dict(beam_width=0), "beam_width"), (dict(beam_width=2.0), "beam_width"),
                    (dict(max_tokens=0), "max_tokens"),
                    (dict(num_return_sequences=3), "num_return_sequences"),
                    (dict(num_return_sequences=0), "num_return_sequences"),
                    (dict(early_stopping="always"), "early_stopping"),
                    (dict(early_stopping=1), "early_stopping"),
                    (dict(length_penalty=float("nan")), "length_penalty")]:
    with pytest.raises(jinfer.InvalidRequestError, match=word):
      jinfer.BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **bad})


def test_beam_search_rejects_bad_requests(tiny_model):
  params = jinfer.BeamSearchParams(beam_width=2, max_tokens=4)
  with pytest.raises(jinfer.InvalidRequestError, match="wrap a single prompt"):
    jinfer.beam_search(tiny_model, "not a list", params)
  with pytest.raises(jinfer.InvalidRequestError, match="context"):
    jinfer.beam_search(tiny_model, ["a"], jinfer.BeamSearchParams(beam_width=2, max_tokens=10**5))
  with pytest.raises(jinfer.InvalidRequestError, match="outside the vocabulary"):
    jinfer.beam_search(tiny_model, ["a"], jinfer.BeamSearchParams(
        beam_width=2, max_tokens=4, stop_token_ids=[10**6]))
  with pytest.raises(jinfer.InvalidRequestError, match="BeamSearchParams"):
    jinfer.beam_search(tiny_model, ["a"], SamplingParams())


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_torch(smollm2_gguf_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(2)
  path = Path(smollm2_gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model.eval()


def _transformers_beams(model, ids, params: jinfer.BeamSearchParams):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model.generate(
        torch.tensor([ids]), num_beams=params.beam_width, do_sample=False,
        max_new_tokens=params.max_tokens, early_stopping=params.early_stopping,
        length_penalty=params.length_penalty, num_return_sequences=params.num_return_sequences,
        eos_token_id=2, pad_token_id=2, output_scores=True, return_dict_in_generate=True)
  sequences = []
  for row in out.sequences[:, len(ids):].tolist():
    sequences.append(row[:row.index(2) + 1] if 2 in row else row)  # drop the padding after EOS
  return sequences, out.sequences_scores.numpy()


def _chat(tokenizer, content):
  return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]))


@pytest.mark.slow
@pytest.mark.parametrize("width,length_penalty,early_stopping,num_prompts", [
    (2, 1.0, True, 3), (4, 1.0, True, 3), (2, 2.0, False, 2), (2, 0.5, "never", 2)])
def test_smollm2_matches_transformers(smollm2, smollm2_torch, width, length_penalty,
                                      early_stopping, num_prompts):
  tok = smollm2.tokenizer
  prompts = [_chat(tok, "What is the capital of France?"),
             tok.encode("The three primary colours are"),
             _chat(tok, "Name a yellow fruit.")][:num_prompts]
  params = jinfer.BeamSearchParams(
      beam_width=width, max_tokens=12, length_penalty=length_penalty,
      early_stopping=early_stopping, num_return_sequences=width)
  ours = jinfer.beam_search(smollm2, prompts, params)  # one ragged batch
  for ids, hypotheses in zip(prompts, ours):
    want_ids, want_scores = _transformers_beams(smollm2_torch, ids, params)
    assert [h.token_ids for h in hypotheses] == want_ids
    # Observed: scores agree to 1e-5 relative (float32 logits differ by ~1e-4 between the two).
    np.testing.assert_allclose([h.score for h in hypotheses], want_scores, rtol=1e-4, atol=1e-4)
  # The France answers end in EOS before max_tokens, so finished hypotheses compete with running
  # beams; with the per-token average (length_penalty 1) the shortest answer wins.
  assert all(h.finish_reason == "stop" and len(h.token_ids) < 12 for h in ours[0][:2])
  if length_penalty == 1.0:
    assert ours[0][0].text == "The capital of France is Paris."
