"""The sampling loop: a `lax.while_loop` over a `DecodeState`, seeing the model only through
`tokens_to_logits(tokens [B], positions [B], cache) -> (logits [B, V], cache)`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from jinfer.decoding.sampling import SamplingArrays, filtered_logits, process_logits, sample

TokensToLogits = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
PAD_TOKEN = -1


@flax.struct.dataclass
class DecodeState:
  """Everything the loop carries. L is the capacity for generated tokens, N the top-logprobs."""

  cache: Any
  step: jax.Array  # scalar: index of the next token to generate
  tokens_BxL: jax.Array  # generated ids, PAD_TOKEN where none
  logprobs_BxL: jax.Array  # log-probability of each generated id (raw or processed, per row)
  top_ids_BxLxN: jax.Array  # the N most likely ids at each step
  top_logprobs_BxLxN: jax.Array
  num_generated_B: jax.Array
  done_B: jax.Array
  prompt_lens_B: jax.Array
  prompt_mask_BxV: jax.Array  # bool: token occurs in the prompt (repetition penalty)
  output_counts_BxV: jax.Array  # int32: times each token was generated (penalties)


def _reported_log_probs(raw_BxV, processed_BxV, s: SamplingArrays, tokens_B: jax.Array,
                        num_top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per row, under the raw logits' softmax or (s.processed_logprobs) the distribution actually
  sampled from: the chosen token's log-probability [B], and the `num_top` most likely tokens'
  log-probabilities and ids [B, num_top].

  Normalizing with a logsumexp [B] instead of a [B, V] log-softmax saves a pass over the
  vocabulary every step.
  """
  def log_probs(logits_BxV):
    logits_BxV = logits_BxV.astype(jnp.float32)
    log_total_Bx1 = jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    chosen_B = jnp.take_along_axis(logits_BxV, tokens_B[:, None], axis=-1)[:, 0]
    top_values_BxN, top_ids_BxN = jax.lax.top_k(logits_BxV, num_top)
    return chosen_B - log_total_Bx1[:, 0], top_values_BxN - log_total_Bx1, top_ids_BxN

  raw = log_probs(raw_BxV)

  def with_processed(_):
    processed = log_probs(filtered_logits(processed_BxV, s))
    pick = lambda p, r: jnp.where(
        s.processed_logprobs.reshape((-1,) + (1,) * (p.ndim - 1)), p, r)
    return jax.tree.map(pick, processed, raw)

  return jax.lax.cond(jnp.any(s.processed_logprobs), with_processed, lambda _: raw, None)


def _recent_tokens(state: DecodeState, count: int) -> jax.Array:
  """[B, count]: the last `count` generated tokens, right-aligned, PAD_TOKEN before the first."""
  batch = state.tokens_BxL.shape[0]
  padded = jnp.concatenate([jnp.full((batch, count), PAD_TOKEN, jnp.int32), state.tokens_BxL], 1)
  return jax.lax.dynamic_slice(padded, (0, state.step), (batch, count))


def _record(state: DecodeState, logits_BxV, sampling: SamplingArrays) -> DecodeState:
  """Samples the token at `state.step` for rows still running and updates their done flags."""
  processed_BxV = process_logits(logits_BxV, sampling, state.output_counts_BxV,
                                 state.prompt_mask_BxV, state.num_generated_B,
                                 _recent_tokens(state, sampling.bad_prefix_BxWxR.shape[-1]))
  tokens_B = sample(processed_BxV, sampling, state.step)
  top_ids_BxLxN, top_logprobs_BxLxN = state.top_ids_BxLxN, state.top_logprobs_BxLxN
  chosen_B, top_values_BxN, top_ids_BxN = _reported_log_probs(
      logits_BxV, processed_BxV, sampling, tokens_B, top_ids_BxLxN.shape[-1])
  active_B = ~state.done_B
  column = state.step
  rows = jnp.arange(tokens_B.shape[0])
  tokens_BxL = state.tokens_BxL.at[:, column].set(jnp.where(active_B, tokens_B, PAD_TOKEN))
  logprobs_BxL = state.logprobs_BxL.at[:, column].set(jnp.where(active_B, chosen_B, 0.0))
  if top_ids_BxLxN.shape[-1]:
    top_ids_BxLxN = top_ids_BxLxN.at[:, column].set(top_ids_BxN)
    top_logprobs_BxLxN = top_logprobs_BxLxN.at[:, column].set(top_values_BxN)
  num_generated_B = state.num_generated_B + active_B
  output_counts_BxV = state.output_counts_BxV.at[rows, tokens_B].add(active_B.astype(jnp.int32))
  hit_stop_B = sampling.stop_mask_BxV[rows, tokens_B]
  done_B = state.done_B | hit_stop_B | (num_generated_B >= sampling.max_tokens)
  return state.replace(step=state.step + 1, tokens_BxL=tokens_BxL, logprobs_BxL=logprobs_BxL,
                       top_ids_BxLxN=top_ids_BxLxN, top_logprobs_BxLxN=top_logprobs_BxLxN,
                       num_generated_B=num_generated_B, done_B=done_B,
                       output_counts_BxV=output_counts_BxV)


def init_state(cache, prompt_lens_B: jax.Array, prompt_mask_BxV: jax.Array, capacity: int,
               num_top_logprobs: int, first_logits_BxV: jax.Array, sampling: SamplingArrays,
               done_B: jax.Array) -> DecodeState:
  """The state after the prompt: the first token sampled from the prefill logits."""
  batch, vocab = prompt_mask_BxV.shape
  state = DecodeState(
      cache=cache, step=jnp.zeros((), jnp.int32),
      tokens_BxL=jnp.full((batch, capacity), PAD_TOKEN, jnp.int32),
      logprobs_BxL=jnp.zeros((batch, capacity), jnp.float32),
      top_ids_BxLxN=jnp.zeros((batch, capacity, num_top_logprobs), jnp.int32),
      top_logprobs_BxLxN=jnp.zeros((batch, capacity, num_top_logprobs), jnp.float32),
      num_generated_B=jnp.zeros((batch,), jnp.int32), done_B=done_B, prompt_lens_B=prompt_lens_B,
      prompt_mask_BxV=prompt_mask_BxV, output_counts_BxV=jnp.zeros((batch, vocab), jnp.int32))
  return _record(state, first_logits_BxV, sampling)


def decode(tokens_to_logits: TokensToLogits, state: DecodeState, sampling: SamplingArrays,
           until_step: jax.Array) -> DecodeState:
  """Generates until every row is done, the buffer is full, or `step == until_step`."""
  capacity = state.tokens_BxL.shape[1]

  def cond(s: DecodeState):
    return (s.step < jnp.minimum(until_step, capacity)) & ~jnp.all(s.done_B)

  def body(s: DecodeState):
    previous_B = jnp.maximum(s.tokens_BxL[:, s.step - 1], 0)
    # Finished rows keep re-writing their last slot: harmless, and never past the cache's end.
    positions_B = s.prompt_lens_B + jnp.minimum(s.step, s.num_generated_B) - 1
    logits_BxV, cache = tokens_to_logits(previous_B, positions_B, s.cache)
    return _record(s.replace(cache=cache), logits_BxV, sampling)

  return jax.lax.while_loop(cond, body, state)
