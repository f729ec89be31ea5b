"""Beam search as one jitted program: prefill each prompt once, then a `lax.while_loop`.

The selection rules are transformers' (5.x `GenerationMixin._beam_search`), step for step:

* Each step scores every continuation of every running beam, `sum_logprobs + logprob`, over
  [W * V], and keeps the top C = max(2, 1 + number of stop ids) * W candidates, so that W
  candidates that did not stop always remain to continue the search. (jinfer rounds the number
  of stop ids up to a power of two to share compiled programs: more candidates never change the
  result.)
* The W best candidates that did not stop (no stop token, not at `max_tokens`) become the running
  beams; the KV-cache rows are gathered from their parent beams.
* A candidate is finished when it ends in a stop token (which counts as generated) or reaches
  `max_tokens`, but only candidates ranked in the top W may enter the prompt's buffer of W
  finished hypotheses, scored `sum_logprobs / generated_length ** length_penalty`.
* `early_stopping`: True stops a prompt once its buffer holds W hypotheses. False and "never"
  stop it once the best running beam cannot beat the worst hypothesis in a full buffer, assuming
  it ends now (False), or, with "never" and a positive length penalty, at `max_tokens`.

Loops see the model only through `tokens_to_logits(tokens [N], positions [N], cache)`, N = B * W
rows (rows b*W .. b*W+W-1 are prompt b's beams), so `search` can be tested with hand-made logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jinfer.buckets import bucket
from jinfer.decoding.programs import COMPILED, decode_step_fn, prefill_logits
from jinfer.decoding.requests import encode_prompts, stop_ids
from jinfer.decoding.results import GenerationStats
from jinfer.decoding.loop import PAD_TOKEN, TokensToLogits
from jinfer import sharding, validation
from jinfer.validation import Prompt, check_request

# transformers' "impossible" score. Added rather than -inf so that sums stay finite and ordered.
NEG = -1.0e9
EARLY_STOPPING_MODES = {False: 0, True: 1, "never": 2}
MAX_BEAM_WIDTH = 128  # beams are rows of the batch, each with its own KV cache


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
  """Beam search settings (transformers' semantics; see the module docstring).

  Sequences end at a stop token (the tokenizer's EOS ids unless `ignore_eos`, plus
  `stop_token_ids`) or at `max_tokens` generated tokens. The `num_return_sequences` best finished
  hypotheses per prompt are returned, best first.
  """

  beam_width: int
  max_tokens: int
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  num_return_sequences: int = 1
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    v = validation
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("stop_token_ids", tuple(v.token_ids(
        "stop_token_ids", () if self.stop_token_ids is None else self.stop_token_ids,
        allow_empty=True)))
    set_("beam_width", v.integer("beam_width", self.beam_width, low=1, high=MAX_BEAM_WIDTH))
    set_("max_tokens", v.integer("max_tokens", self.max_tokens, low=1))
    set_("length_penalty", v.number(
        "length_penalty", self.length_penalty,
        hint=" (1.0 averages log-probabilities per token, 0.0 sums them)"))
    v.one_of("early_stopping", self.early_stopping, (True, False, "never"))
    set_("num_return_sequences", v.integer(
        "num_return_sequences", self.num_return_sequences, low=1, high=self.beam_width,
        hint=" (beam_width; raise beam_width or return fewer sequences)"))
    set_("ignore_eos", v.boolean("ignore_eos", self.ignore_eos))


@dataclasses.dataclass
class BeamSequence:
  """One finished hypothesis. `finish_reason` is 'stop' (ends in a stop token) or 'length'."""

  token_ids: list[int]  # generated tokens, the stop token included
  text: str
  cumulative_logprob: float  # sum of the generated tokens' log-probabilities
  score: float  # cumulative_logprob / len(token_ids) ** length_penalty
  finish_reason: str


# ----------------------------------------------------------------------------- the search


@flax.struct.dataclass
class BeamSettings:
  """Per-request values as traced scalars (changing them never recompiles)."""

  max_tokens: jax.Array  # int32
  length_penalty: jax.Array  # float32
  early_stopping: jax.Array  # int32: EARLY_STOPPING_MODES value
  stop_ids_M: jax.Array  # int32, padded with -2 (matches no token)

  @classmethod
  def create(cls, params: BeamSearchParams, stop_ids: Sequence[int], size: int) -> "BeamSettings":
    """Settings of `params`, with `stop_ids` padded to `size` entries by -2."""
    stop_ids_M = np.full((size,), -2, np.int32)
    stop_ids_M[:len(stop_ids)] = stop_ids
    return cls(np.int32(params.max_tokens), np.float32(params.length_penalty),
               np.int32(EARLY_STOPPING_MODES[params.early_stopping]), stop_ids_M)


@flax.struct.dataclass
class BeamState:
  """The loop's carry: B prompts, W beams each, L generated-token capacity."""

  cache: Any  # rows b*W + w, ordered like the running beams
  step: jax.Array  # scalar: tokens generated so far by each running beam
  running_BxWxL: jax.Array  # running beams' generated tokens, PAD_TOKEN past `step`
  running_logprobs_BxW: jax.Array  # their sums of log-probabilities
  finished_BxWxL: jax.Array  # finished hypotheses, best first
  finished_scores_BxW: jax.Array  # length-penalized; NEG for an empty slot
  finished_logprobs_BxW: jax.Array
  finished_lens_BxW: jax.Array
  is_finished_BxW: jax.Array  # the slot holds a real hypothesis
  improvable_B: jax.Array  # transformers' is_early_stop_heuristic_unsatisfied
  done_B: jax.Array


def init_state(cache, batch: int, width: int, capacity: int, active_B: jax.Array) -> BeamState:
  """Empty beams; only beam 0 is live, so the first step's W beams are distinct continuations."""
  running_logprobs_BxW = jnp.zeros((batch, width), jnp.float32).at[:, 1:].set(NEG)
  empty_BxWxL = jnp.full((batch, width, capacity), PAD_TOKEN, jnp.int32)
  return BeamState(
      cache=cache, step=jnp.zeros((), jnp.int32), running_BxWxL=empty_BxWxL,
      running_logprobs_BxW=running_logprobs_BxW, finished_BxWxL=empty_BxWxL,
      finished_scores_BxW=jnp.full((batch, width), NEG, jnp.float32),
      finished_logprobs_BxW=jnp.zeros((batch, width), jnp.float32),
      finished_lens_BxW=jnp.zeros((batch, width), jnp.int32),
      is_finished_BxW=jnp.zeros((batch, width), bool), improvable_B=active_B, done_B=~active_B)


def _gather(x_BxCx___: jax.Array, index_BxW: jax.Array) -> jax.Array:
  """x[b, index[b, w], ...] for every b, w."""
  index = index_BxW.reshape(index_BxW.shape + (1,) * (x_BxCx___.ndim - 2))
  return jnp.take_along_axis(x_BxCx___, index, axis=1)


def _penalized(logprobs: jax.Array, length: jax.Array, settings: BeamSettings) -> jax.Array:
  return logprobs / length.astype(jnp.float32) ** settings.length_penalty


def _step(s: BeamState, logprobs_BxWxV: jax.Array, settings: BeamSettings,
          num_candidates: int) -> BeamState:
  """Extends the beams by one token: picks candidates, files finished ones, reorders the cache."""
  batch, width, vocab = logprobs_BxWxV.shape
  totals_BxWV = (s.running_logprobs_BxW[:, :, None] + logprobs_BxWxV).reshape(batch, -1)
  cand_logprobs_BxC, flat_BxC = jax.lax.top_k(totals_BxWV, num_candidates)
  parents_BxC, tokens_BxC = flat_BxC // vocab, flat_BxC % vocab
  cand_BxCxL = _gather(s.running_BxWxL, parents_BxC).at[:, :, s.step].set(tokens_BxC)
  stopped_BxC = (jnp.any(tokens_BxC[..., None] == settings.stop_ids_M, axis=-1)
                 | (s.step + 1 >= settings.max_tokens))
  s = _file_finished(s, cand_BxCxL, cand_logprobs_BxC, stopped_BxC, settings)
  # The W best candidates that did not stop run on.
  running_logprobs_BxW, keep_BxW = jax.lax.top_k(
      cand_logprobs_BxC + jnp.where(stopped_BxC, NEG, 0.0), width)
  s = s.replace(step=s.step + 1, running_BxWxL=_gather(cand_BxCxL, keep_BxW),
                running_logprobs_BxW=running_logprobs_BxW,
                cache=_reorder(s.cache, _gather(parents_BxC, keep_BxW)))
  return _update_done(s, settings, all_stopped_B=jnp.all(stopped_BxC, axis=-1))


def _file_finished(s: BeamState, cand_BxCxL: jax.Array, cand_logprobs_BxC: jax.Array,
                   stopped_BxC: jax.Array, settings: BeamSettings) -> BeamState:
  """Merges the stopped candidates ranked in the top W into the buffer of W best hypotheses.

  Candidates ranked below W are dropped even if they stopped (they only exist so that W
  unstopped ones remain); nothing is filed once a prompt cannot improve or, with
  `early_stopping=True`, once its buffer is full.
  """
  width = s.finished_scores_BxW.shape[1]
  length = s.step + 1  # generated tokens, the stop token included
  full_B = (jnp.all(s.is_finished_BxW, axis=-1)
            & (settings.early_stopping == EARLY_STOPPING_MODES[True]))
  files_BxC = (stopped_BxC & (jnp.arange(stopped_BxC.shape[1]) < width)
               & (s.improvable_B & ~full_B)[:, None])
  cand_scores_BxC = jnp.where(files_BxC, _penalized(cand_logprobs_BxC, length, settings), NEG)
  finished_scores_BxW, best_BxW = jax.lax.top_k(
      jnp.concatenate([s.finished_scores_BxW, cand_scores_BxC], axis=1), width)

  def merged(old_BxWx___, new_BxCx___):
    return _gather(jnp.concatenate([old_BxWx___, new_BxCx___], axis=1), best_BxW)

  return s.replace(
      finished_BxWxL=merged(s.finished_BxWxL, cand_BxCxL),
      finished_scores_BxW=finished_scores_BxW,
      finished_logprobs_BxW=merged(s.finished_logprobs_BxW, cand_logprobs_BxC),
      finished_lens_BxW=merged(s.finished_lens_BxW, jnp.broadcast_to(length, stopped_BxC.shape)),
      is_finished_BxW=merged(s.is_finished_BxW, files_BxC))


def _reorder(cache, parents_BxW: jax.Array):
  """Each beam's cache row becomes a copy of its parent's (a gather along the batch axis)."""
  batch, width = parents_BxW.shape
  rows_N = (jnp.arange(batch)[:, None] * width + parents_BxW).reshape(-1)
  return jax.tree.map(lambda x: jnp.take(x, rows_N, axis=0), cache)


def _update_done(s: BeamState, settings: BeamSettings, all_stopped_B: jax.Array) -> BeamState:
  """transformers' `_check_early_stop_heuristic` and stopping conditions, per prompt."""
  never = settings.early_stopping == EARLY_STOPPING_MODES["never"]
  best_length = jnp.where(never & (settings.length_penalty > 0), settings.max_tokens, s.step)
  best_possible_B = _penalized(s.running_logprobs_BxW[:, 0], best_length, settings)
  worst_finished_BxW = jnp.where(
      s.is_finished_BxW, jnp.min(s.finished_scores_BxW, axis=-1, keepdims=True), NEG)
  improvable_B = s.improvable_B & jnp.any(best_possible_B[:, None] > worst_finished_BxW, axis=-1)
  full_B = (jnp.all(s.is_finished_BxW, axis=-1)
            & (settings.early_stopping == EARLY_STOPPING_MODES[True]))
  return s.replace(improvable_B=improvable_B,
                   done_B=s.done_B | ~improvable_B | full_B | all_stopped_B)


def search(tokens_to_logits: TokensToLogits, state: BeamState, first_logits_BxV: jax.Array,
           prompt_lens_B: jax.Array, settings: BeamSettings, num_candidates: int) -> BeamState:
  """Runs beam search from the prompts' last-position logits until every prompt is done.

  `state.cache` holds every prompt's cache repeated W times (rows b*W .. b*W+W-1).
  """
  batch, width, capacity = state.running_BxWxL.shape
  first_BxWxV = jnp.broadcast_to(
      jax.nn.log_softmax(first_logits_BxV.astype(jnp.float32), axis=-1)[:, None],
      (batch, width, first_logits_BxV.shape[-1]))
  state = _step(state, first_BxWxV, settings, num_candidates)

  def cond(s: BeamState):
    return ~jnp.all(s.done_B) & (s.step < capacity)

  def body(s: BeamState):
    tokens_N = s.running_BxWxL[:, :, s.step - 1].reshape(-1)
    positions_N = jnp.repeat(prompt_lens_B + s.step - 1, width)
    logits_NxV, cache = tokens_to_logits(tokens_N, positions_N, s.cache)
    logprobs_BxWxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1).reshape(
        batch, width, -1)
    return _step(s.replace(cache=cache), logprobs_BxWxV, settings, num_candidates)

  return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------- the model program


def _beam_program(params, tokens_BxT, prompt_lens_B, active_B, settings, *, config, cache_len,
                  cache_dtype, capacity, width, num_candidates) -> BeamState:
  logits_BxV, cache = prefill_logits(params, config, tokens_BxT, prompt_lens_B, cache_len,
                                     cache_dtype)
  cache = jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), cache)

  state = init_state(cache, tokens_BxT.shape[0], width, capacity, active_B)
  state = search(decode_step_fn(params, config), state, logits_BxV, prompt_lens_B, settings, num_candidates)
  return sharding.host_readable(state.replace(cache=None))  # the caller needs the hypotheses


_BEAM_PROGRAM = jax.jit(_beam_program, static_argnames=(
    "config", "cache_len", "cache_dtype", "capacity", "width", "num_candidates"))


def _padded_prompts(prompt_ids: list[list[int]],
                    mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded tokens [B, T], lengths [B] and active rows [B], B and T bucketed (B a whole
  number of rows per data shard of `mesh`)."""
  batch = sharding.round_up_rows(bucket(len(prompt_ids), minimum=1), mesh)
  tokens_BxT = np.zeros((batch, bucket(max(map(len, prompt_ids)))), np.int32)
  prompt_lens_B = np.ones((batch,), np.int32)
  for i, ids in enumerate(prompt_ids):
    tokens_BxT[i, :len(ids)] = ids
    prompt_lens_B[i] = len(ids)
  return tokens_BxT, prompt_lens_B, np.arange(batch) < len(prompt_ids)


def beam_search(model, prompts: Sequence[Prompt], params: BeamSearchParams, *,
                mesh=None) -> list[list[BeamSequence]]:
  """Beam search for each prompt (a string or a list of token ids).

  Returns, per prompt, its `params.num_return_sequences` best hypotheses, best first. `mesh`
  shards the model over it first (`Model.shard`); a model already sharded runs on its mesh.
  """
  validation.model(model)
  model = model if mesh is None else model.shard(mesh)
  check_request(isinstance(params, BeamSearchParams),
                f"params must be a BeamSearchParams, got {type(params).__name__}.")
  prompt_ids = encode_prompts(model, prompts)
  for i, ids in enumerate(prompt_ids):
    validation.fits_context(i, len(ids), params.max_tokens, model.config.max_seq_len)
  validation.token_ids("stop_token_ids", params.stop_token_ids, model.config.vocab_size,
                       allow_empty=True)
  stop_token_ids = sorted(set(stop_ids(model, params)))
  tokens_BxT, prompt_lens_B, active_B = _padded_prompts(prompt_ids, model.mesh)
  capacity = bucket(params.max_tokens)
  # bucketed: more candidates never change the result
  stops = bucket(len(stop_token_ids), minimum=1)
  settings = BeamSettings.create(params, stop_token_ids, stops)
  args = (model.params, tokens_BxT, prompt_lens_B, active_B, settings)
  static = dict(config=model.config, cache_len=tokens_BxT.shape[1] + capacity,
                cache_dtype=jnp.dtype(model.cache_dtype), capacity=capacity,
                width=params.beam_width,
                num_candidates=min(1 + stops, model.config.vocab_size) * params.beam_width)
  state = COMPILED.get(_BEAM_PROGRAM, args, static, GenerationStats(), model.mesh)(*args)
  return results(model.tokenizer, jax.device_get(state), len(prompt_ids), params, stop_token_ids)


def results(tokenizer, state: BeamState, count: int, params: BeamSearchParams,
            stop_ids: Sequence[int]) -> list[list[BeamSequence]]:
  """The `num_return_sequences` best hypotheses of the first `count` prompts of a final state."""
  per_prompt = []
  for b in range(count):
    sequences = []
    for r in range(params.num_return_sequences):
      ids = state.finished_BxWxL[b, r, :state.finished_lens_BxW[b, r]].tolist()
      sequences.append(BeamSequence(
          token_ids=ids, text=tokenizer.decode(ids, skip_special_tokens=True),
          cumulative_logprob=float(state.finished_logprobs_BxW[b, r]),
          score=float(state.finished_scores_BxW[b, r]),
          finish_reason="stop" if ids and ids[-1] in stop_ids else "length"))
    per_prompt.append(sequences)
  return per_prompt
