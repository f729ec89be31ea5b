"""Sampling parameters (vLLM's field names) and a vectorised sampler with per-row settings.

Per-request values become traced arrays (`SamplingArrays`), so one compiled loop serves a batch
whose rows all have different settings, and changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jinfer.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to decode one prompt. `temperature=0` is greedy; `top_k=0` and `top_p=1` disable those.

  `seed` makes a row's samples reproducible whatever else is in the batch; `None` draws a fresh
  seed per call. `stop_token_ids` end a sequence in addition to the tokenizer's EOS ids, unless
  `ignore_eos` is set (then only `stop_token_ids` and `max_tokens` end it).
  """

  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  seed: Optional[int] = None
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
    _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
           f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
    _check(self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
    _check(self.top_k >= 0 or self.top_k == -1,
           f"top_k must be >= 1, or 0 / -1 to disable it, got {self.top_k}.")
    _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}.")
    _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}.")
    _check(self.seed is None or isinstance(self.seed, (int, np.integer)),
           f"seed must be an integer or None, got {self.seed!r}.")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise InvalidRequestError(message)


@flax.struct.dataclass
class SamplingArrays:
  """Per-row sampling settings as device arrays, each of shape [B]."""

  temperature: jax.Array
  top_k: jax.Array  # 0 means no top-k
  top_p: jax.Array
  min_p: jax.Array
  max_tokens: jax.Array
  rng_keys: jax.Array  # [B] typed PRNG keys, one per row from its seed

  @classmethod
  def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int]) -> "SamplingArrays":
    column = lambda name, dtype: jnp.asarray([getattr(p, name) for p in params], dtype)
    return cls(
        temperature=column("temperature", jnp.float32),
        top_k=jnp.asarray([max(p.top_k, 0) for p in params], jnp.int32),
        top_p=column("top_p", jnp.float32),
        min_p=column("min_p", jnp.float32),
        max_tokens=column("max_tokens", jnp.int32),
        rng_keys=jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))


def filtered_logits(logits_BxV: jax.Array, s: SamplingArrays) -> jax.Array:
  """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
  temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
  scaled = logits_BxV.astype(jnp.float32) / temperature
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  rank = jnp.arange(scaled.shape[-1])[None, :]
  top_k = jnp.where(s.top_k > 0, s.top_k, scaled.shape[-1])[:, None]
  # Keep a token if the tokens ranked above it hold less than top_p (so the first is always kept).
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = ((rank < top_k) & (mass_before < s.top_p[:, None])
                 & (sorted_probs >= s.min_p[:, None] * sorted_probs[:, :1]))
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, scaled, -jnp.inf)


def sample(logits_BxV: jax.Array, s: SamplingArrays, step: jax.Array) -> jax.Array:
  """Next token per row: argmax where temperature is 0, else a draw from the filtered softmax.

  Row b draws with fold_in(key_b, step), so its samples depend only on its own seed and step.
  """
  greedy = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw(_):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.rng_keys, step)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits_BxV, s))
    return jnp.where(s.temperature > 0, drawn.astype(jnp.int32), greedy)

  # Sorting the vocabulary costs more than the argmax: skip it when every row is greedy.
  return jax.lax.cond(jnp.any(s.temperature > 0), draw, lambda _: greedy, None)
