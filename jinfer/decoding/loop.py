"""The sampling loop: a `lax.while_loop` over a `DecodeState`, seeing the model only through
`tokens_to_logits(tokens [B], positions [B], cache) -> (logits [B, V], cache)`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from jinfer.decoding.sampling import SamplingArrays, sample

TokensToLogits = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
PAD_TOKEN = -1


@flax.struct.dataclass
class DecodeState:
  """Everything the loop carries. L is the capacity for generated tokens."""

  cache: Any
  step: jax.Array  # scalar: index of the next token to generate
  tokens_BxL: jax.Array  # generated ids, PAD_TOKEN where none
  logprobs_BxL: jax.Array  # log-probability of each generated id under the model
  num_generated_B: jax.Array
  done_B: jax.Array
  prompt_lens_B: jax.Array


def _log_softmax_at(logits_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  log_probs = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, tokens_B[:, None], axis=-1)[:, 0]


def _record(state: DecodeState, logits_BxV, sampling: SamplingArrays,
            stop_ids_BxM: jax.Array) -> DecodeState:
  """Samples the token at `state.step` for rows still running and updates their done flags."""
  tokens_B = sample(logits_BxV, sampling, state.step)
  active_B = ~state.done_B
  column = state.step
  tokens_BxL = state.tokens_BxL.at[:, column].set(jnp.where(active_B, tokens_B, PAD_TOKEN))
  logprobs_BxL = state.logprobs_BxL.at[:, column].set(
      jnp.where(active_B, _log_softmax_at(logits_BxV, tokens_B), 0.0))
  num_generated_B = state.num_generated_B + active_B
  hit_stop_B = jnp.any(tokens_B[:, None] == stop_ids_BxM, axis=-1)
  done_B = state.done_B | hit_stop_B | (num_generated_B >= sampling.max_tokens)
  return state.replace(step=state.step + 1, tokens_BxL=tokens_BxL, logprobs_BxL=logprobs_BxL,
                       num_generated_B=num_generated_B, done_B=done_B)


def init_state(cache, prompt_lens_B: jax.Array, capacity: int, first_logits_BxV: jax.Array,
               sampling: SamplingArrays, stop_ids_BxM: jax.Array,
               done_B: jax.Array) -> DecodeState:
  """The state after the prompt: the first token sampled from the prefill logits."""
  batch = prompt_lens_B.shape[0]
  state = DecodeState(
      cache=cache, step=jnp.zeros((), jnp.int32),
      tokens_BxL=jnp.full((batch, capacity), PAD_TOKEN, jnp.int32),
      logprobs_BxL=jnp.zeros((batch, capacity), jnp.float32),
      num_generated_B=jnp.zeros((batch,), jnp.int32), done_B=done_B, prompt_lens_B=prompt_lens_B)
  return _record(state, first_logits_BxV, sampling, stop_ids_BxM)


def decode(tokens_to_logits: TokensToLogits, state: DecodeState, sampling: SamplingArrays,
           stop_ids_BxM: jax.Array, until_step: jax.Array) -> DecodeState:
  """Generates until every row is done, the buffer is full, or `step == until_step`."""
  capacity = state.tokens_BxL.shape[1]

  def cond(s: DecodeState):
    return (s.step < jnp.minimum(until_step, capacity)) & ~jnp.all(s.done_B)

  def body(s: DecodeState):
    previous_B = jnp.maximum(s.tokens_BxL[:, s.step - 1], 0)
    # Finished rows keep re-writing their last slot: harmless, and never past the cache's end.
    positions_B = s.prompt_lens_B + jnp.minimum(s.step, s.num_generated_B) - 1
    logits_BxV, cache = tokens_to_logits(previous_B, positions_B, s.cache)
    return _record(s.replace(cache=cache), logits_BxV, sampling, stop_ids_BxM)

  return jax.lax.while_loop(cond, body, state)
