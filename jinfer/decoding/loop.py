"""The sampling loop: a `lax.while_loop` over a `DecodeState`, seeing the model only through
`tokens_to_logits(tokens [B], positions [B], cache) -> (logits [B, V], cache)`.

Every row keeps its own progress (`num_generated_B`: the column of its next token, its position
and its RNG step); there is no batch-wide step, so a row can be refilled while the others run.
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
  tokens_BxL: jax.Array  # generated ids, PAD_TOKEN where none
  logprobs_BxL: jax.Array  # log-probability of each generated id (raw or processed, per row)
  top_ids_BxLxN: jax.Array  # the N most likely ids at each step
  top_logprobs_BxLxN: jax.Array
  num_generated_B: jax.Array  # tokens generated so far: the column of the row's next token
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
  """[B, count]: each row's last `count` generated tokens, right-aligned, PAD_TOKEN before the
  first."""
  columns_BxR = state.num_generated_B[:, None] - count + jnp.arange(count)
  recent_BxR = jnp.take_along_axis(state.tokens_BxL, jnp.maximum(columns_BxR, 0), axis=1)
  return jnp.where(columns_BxR >= 0, recent_BxR, PAD_TOKEN)


def _record(state: DecodeState, logits_BxV, sampling: SamplingArrays) -> DecodeState:
  """Samples each running row's next token (at its column `num_generated_B`) and updates the
  done flags; finished rows change nothing."""
  processed_BxV = process_logits(logits_BxV, sampling, state.output_counts_BxV,
                                 state.prompt_mask_BxV, state.num_generated_B,
                                 _recent_tokens(state, sampling.bad_prefix_BxWxR.shape[-1]))
  tokens_B = sample(processed_BxV, sampling, state.num_generated_B)
  top_ids_BxLxN, top_logprobs_BxLxN = state.top_ids_BxLxN, state.top_logprobs_BxLxN
  chosen_B, top_values_BxN, top_ids_BxN = _reported_log_probs(
      logits_BxV, processed_BxV, sampling, tokens_B, top_ids_BxLxN.shape[-1])
  active_B = ~state.done_B
  capacity = state.tokens_BxL.shape[1]
  # Finished rows write past the end, which drops the write.
  column_B = jnp.where(active_B, state.num_generated_B, capacity)
  rows = jnp.arange(tokens_B.shape[0])
  tokens_BxL = state.tokens_BxL.at[rows, column_B].set(tokens_B, mode="drop")
  logprobs_BxL = state.logprobs_BxL.at[rows, column_B].set(chosen_B, mode="drop")
  if top_ids_BxLxN.shape[-1]:
    top_ids_BxLxN = top_ids_BxLxN.at[rows, column_B].set(top_ids_BxN, mode="drop")
    top_logprobs_BxLxN = top_logprobs_BxLxN.at[rows, column_B].set(top_values_BxN, mode="drop")
  num_generated_B = state.num_generated_B + active_B
  output_counts_BxV = state.output_counts_BxV.at[rows, tokens_B].add(active_B.astype(jnp.int32))
  hit_stop_B = sampling.stop_mask_BxV[rows, tokens_B]
  done_B = (state.done_B | hit_stop_B | (num_generated_B >= sampling.max_tokens)
            | (num_generated_B >= capacity))
  return state.replace(tokens_BxL=tokens_BxL, logprobs_BxL=logprobs_BxL,
                       top_ids_BxLxN=top_ids_BxLxN, top_logprobs_BxLxN=top_logprobs_BxLxN,
                       num_generated_B=num_generated_B, done_B=done_B,
                       output_counts_BxV=output_counts_BxV)


def empty_state(cache, batch: int, vocab: int, capacity: int, num_top_logprobs: int) -> DecodeState:
  """A state of `batch` finished rows with nothing generated (an engine's empty slots)."""
  return DecodeState(
      cache=cache, tokens_BxL=jnp.full((batch, capacity), PAD_TOKEN, jnp.int32),
      logprobs_BxL=jnp.zeros((batch, capacity), jnp.float32),
      top_ids_BxLxN=jnp.zeros((batch, capacity, num_top_logprobs), jnp.int32),
      top_logprobs_BxLxN=jnp.zeros((batch, capacity, num_top_logprobs), jnp.float32),
      num_generated_B=jnp.zeros((batch,), jnp.int32), done_B=jnp.ones((batch,), bool),
      prompt_lens_B=jnp.ones((batch,), jnp.int32),
      prompt_mask_BxV=jnp.zeros((batch, vocab), bool),
      output_counts_BxV=jnp.zeros((batch, vocab), jnp.int32))


def init_state(cache, prompt_lens_B: jax.Array, prompt_mask_BxV: jax.Array, capacity: int,
               num_top_logprobs: int, first_logits_BxV: jax.Array, sampling: SamplingArrays,
               done_B: jax.Array) -> DecodeState:
  """The state after the prompt: the first token sampled from the prefill logits."""
  batch, vocab = prompt_mask_BxV.shape
  state = empty_state(cache, batch, vocab, capacity, num_top_logprobs).replace(
      done_B=done_B, prompt_lens_B=prompt_lens_B, prompt_mask_BxV=prompt_mask_BxV)
  return _record(state, first_logits_BxV, sampling)


def decode(tokens_to_logits: TokensToLogits, state: DecodeState, sampling: SamplingArrays,
           num_steps: jax.Array) -> DecodeState:
  """Runs up to `num_steps` steps, fewer if every row is done (at its stop token, max_tokens or
  the buffer's end) before."""

  def cond(carry):
    step, s = carry
    return (step < num_steps) & ~jnp.all(s.done_B)

  def body(carry):
    step, s = carry
    last_B = jnp.maximum(s.num_generated_B - 1, 0)[:, None]
    previous_B = jnp.maximum(jnp.take_along_axis(s.tokens_BxL, last_B, axis=1)[:, 0], 0)
    # Finished rows keep re-writing their last position: harmless, and never past the cache.
    positions_B = s.prompt_lens_B + s.num_generated_B - 1
    logits_BxV, cache = tokens_to_logits(previous_B, positions_B, s.cache)
    return step + 1, _record(s.replace(cache=cache), logits_BxV, sampling)

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))[1]
