"""Speculative decoding: draft k tokens cheaply, verify them with one target forward, accept.

One `lax.while_loop` iteration per target forward: a drafter proposes k tokens per row, the
target scores [last token, k drafts] (T = k + 1) at each row's positions, and each row accepts
a prefix of the drafts plus one token of the target's own:

* greedy rows (temperature 0) accept drafts while they equal the target's argmax, then append the
  target's argmax at the first mismatch (or after all k: the bonus token), so the output equals
  plain greedy decoding;
* sampled rows use exact rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft i is
  accepted with probability min(1, p_i / q_i), where p is the target's filtered distribution
  (temperature, top-k, top-p, min-p) and q the one the draft was drawn from; the first rejected
  position is resampled from normalize(max(0, p - q)), and after k acceptances the bonus token is
  drawn from p. The output then follows the target's distribution exactly, whatever q is.

Three drafters: a smaller jinfer model sharing the tokenizer ("draft_model"), the target's first
layers with its head ("self"), and prompt lookup ("ngram": the tokens that followed the most
recent earlier occurrence of the last n tokens). The loop sees models only through
`target_logits(tokens [B, T], positions [B, T], cache) -> (logits [B, T, V], cache)` and a
`Drafter`, so it can be tested with hand-made logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cache.kv_cache import KVCache
from jinfer.decoding.programs import COMPILED, prefill_logits
from jinfer.decoding.requests import per_prompt_params, prepare_batch
from jinfer.decoding.results import Completion, GenerationStats
from jinfer.decoding.text import SequenceText, finish_reason
from jinfer.decoding.loop import PAD_TOKEN
from jinfer.decoding.sampling import SamplingArrays, filtered_logits, greedy_tokens, sample
from jinfer import sharding, validation
from jinfer.validation import check_request, is_integer
from jinfer.models import llama

METHODS = ("draft_model", "self", "ngram")

TargetLogits = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# drafter(history [B, S], lengths [B], draft_cache, keys [B], sampling)
#   -> (drafts [B, K] int32, draft probabilities q [B, K, V], draft_cache)
# history[b, :lengths[b]] holds prompt + generated tokens; the last one is not yet in any cache
# (except at positions the drafter itself wrote earlier, which it may overwrite).
Drafter = Callable[[jax.Array, jax.Array, Any, jax.Array, SamplingArrays],
                   tuple[jax.Array, jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """How to draft. `num_draft_tokens` (k) tokens are proposed per target forward.

  method "draft_model": `draft_model` (a jinfer Model with the target's vocabulary) drafts
  autoregressively with its own KV cache. "self": the target's first `draft_layers` layers plus
  its final norm and head draft (no extra weights). "ngram": prompt lookup, n from `ngram_max`
  down to `ngram_min`; without a match the last token is proposed (and simply rejected).
  """

  method: str = "ngram"
  num_draft_tokens: int = 4
  draft_model: Any = None
  draft_layers: Optional[int] = None
  ngram_max: int = 3
  ngram_min: int = 1

  def __post_init__(self):
    check_request(self.method in METHODS,
                  f"speculative method must be one of {METHODS}, got {self.method!r}.")
    k = self.num_draft_tokens
    check_request(is_integer(k) and 1 <= k <= 32,
                  f"num_draft_tokens must be an integer in [1, 32], got {k!r}.")
    if self.method == "draft_model":
      check_request(self.draft_model is not None,
                    "method='draft_model' needs draft_model=<a jinfer Model sharing the "
                    "tokenizer>.")
      validation.model(self.draft_model)
    else:
      check_request(self.draft_model is None,
                    f"draft_model is only used with method='draft_model', not {self.method!r}.")
    if self.method == "self":
      check_request(is_integer(self.draft_layers) and self.draft_layers >= 1,
                    f"method='self' needs draft_layers, an integer >= 1, got "
                    f"{self.draft_layers!r}.")
    else:
      check_request(self.draft_layers is None,
                    f"draft_layers is only used with method='self', not {self.method!r}.")
    # Checked whatever the method: they are part of the compiled program's static settings.
    check_request(is_integer(self.ngram_min) and is_integer(self.ngram_max)
                  and 1 <= self.ngram_min <= self.ngram_max <= 16,
                  f"need integers 1 <= ngram_min <= ngram_max <= 16, got "
                  f"ngram_min={self.ngram_min!r}, ngram_max={self.ngram_max!r}.")


# ----------------------------------------------------------------------------- the loop


@flax.struct.dataclass
class SpecState:
  """What the loop carries. S = prompt bucket + capacity + k + 1 history slots per row."""

  target_cache: Any
  draft_cache: Any
  iteration: jax.Array  # scalar: target forwards so far
  history_BxS: jax.Array  # prompt then generated tokens; PAD_TOKEN past them
  logprobs_BxS: jax.Array  # target log-probability of each generated token (raw logits)
  lengths_B: jax.Array  # tokens in history (prompt + generated)
  prompt_lens_B: jax.Array
  num_generated_B: jax.Array
  done_B: jax.Array
  drafted_B: jax.Array  # draft tokens proposed to the target
  accepted_B: jax.Array  # of those, accepted by the verifier
  forwards_B: jax.Array  # target forwards while the row was running


def init_state(target_cache, draft_cache, prompts_BxT, prompt_lens_B, first_logits_BxV,
               sampling: SamplingArrays, done_B, capacity: int, k: int) -> SpecState:
  """The state after the prompt, with the first token sampled from the prefill logits."""
  batch, length = prompts_BxT.shape
  slots = length + capacity + k + 1
  in_prompt_BxT = jnp.arange(length) < prompt_lens_B[:, None]
  history_BxS = jnp.full((batch, slots), PAD_TOKEN, jnp.int32).at[:, :length].set(
      jnp.where(in_prompt_BxT, prompts_BxT, PAD_TOKEN))
  first_B = sample(first_logits_BxV, sampling, jnp.int32(0))
  rows = jnp.arange(batch)
  first_logprob_B = jax.nn.log_softmax(first_logits_BxV.astype(jnp.float32))[rows, first_B]
  active_B = ~done_B
  history_BxS = history_BxS.at[rows, prompt_lens_B].set(jnp.where(active_B, first_B, PAD_TOKEN))
  logprobs_BxS = jnp.zeros((batch, slots), jnp.float32).at[rows, prompt_lens_B].set(
      first_logprob_B)
  num_generated_B = active_B.astype(jnp.int32)
  done_B = done_B | sampling.stop_mask_BxV[rows, first_B] | (num_generated_B >= sampling.max_tokens)
  zeros_B = jnp.zeros((batch,), jnp.int32)
  return SpecState(target_cache=target_cache, draft_cache=draft_cache,
                   iteration=jnp.zeros((), jnp.int32), history_BxS=history_BxS,
                   logprobs_BxS=logprobs_BxS, lengths_B=prompt_lens_B + num_generated_B,
                   prompt_lens_B=prompt_lens_B, num_generated_B=num_generated_B, done_B=done_B,
                   drafted_B=zeros_B, accepted_B=zeros_B, forwards_B=zeros_B)


def _iteration_keys(sampling: SamplingArrays, iteration) -> jax.Array:
  """Per-row keys for one iteration: a row's draws depend only on its seed and the iteration."""
  # Offset so the stream differs from the plain loop's fold_in(key, step) draws.
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(sampling.rng_keys, iteration + (1 << 20))


def accept(target_logits_BxTxV, drafts_BxK, q_BxKxV, sampling: SamplingArrays, keys_B):
  """Verifies k drafts per row; returns (accepted drafts [B], the target's next token [B]).

  The next token is the target's choice at the first rejected position, or the bonus token
  after position k when every draft was accepted.
  """
  batch, k = drafts_BxK.shape
  rows_B = jnp.arange(batch)
  greedy_BxT = greedy_tokens(target_logits_BxTxV)
  greedy_accepted_B = _leading_true(drafts_BxK == greedy_BxT[:, :k])
  greedy_next_B = greedy_BxT[rows_B, greedy_accepted_B]

  def sampled(_):
    p_BxTxV = jax.nn.softmax(
        jax.vmap(lambda l: filtered_logits(l, sampling), in_axes=1, out_axes=1)(
            target_logits_BxTxV), axis=-1)
    q_BxTxV = jnp.concatenate([q_BxKxV.astype(jnp.float32),
                               jnp.zeros_like(p_BxTxV[:, :1])], axis=1)
    pick = lambda x_BxKxV: jnp.take_along_axis(x_BxKxV, drafts_BxK[..., None], axis=-1)[..., 0]
    p_draft_BxK, q_draft_BxK = pick(p_BxTxV[:, :k]), pick(q_BxTxV[:, :k])
    uniform_key_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, k)
    resample_key_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, k + 1)
    u_BxK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(uniform_key_B)
    # Accept with probability min(1, p / q); q > 0 at a token drawn from q.
    accepted_B = _leading_true(u_BxK * q_draft_BxK < p_draft_BxK)
    # At position k, q is zero: the residual is p itself (the bonus token).
    residual_BxV = jnp.maximum(p_BxTxV[rows_B, accepted_B] - q_BxTxV[rows_B, accepted_B], 0.0)
    residual_BxV = jnp.where(residual_BxV.sum(-1, keepdims=True) > 0, residual_BxV,
                             p_BxTxV[rows_B, accepted_B])
    next_B = jax.vmap(jax.random.categorical)(resample_key_B, jnp.log(residual_BxV))
    is_sampled_B = sampling.temperature > 0
    return (jnp.where(is_sampled_B, accepted_B, greedy_accepted_B),
            jnp.where(is_sampled_B, next_B.astype(jnp.int32), greedy_next_B))

  return jax.lax.cond(jnp.any(sampling.temperature > 0), sampled,
                      lambda _: (greedy_accepted_B, greedy_next_B), None)


def _leading_true(mask_BxK) -> jax.Array:
  """Length of the all-True prefix of each row."""
  return jnp.sum(jnp.cumprod(mask_BxK.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def step(target_logits: TargetLogits, drafter: Drafter, state: SpecState,
         sampling: SamplingArrays, k: int) -> SpecState:
  """One iteration: draft k tokens, verify with one target forward, append what was accepted."""
  batch, slots = state.history_BxS.shape
  rows_B = jnp.arange(batch)
  active_B = ~state.done_B
  # Finished rows keep re-running their last positions (nothing is kept): harmless.
  lengths_B = state.lengths_B
  keys_B = _iteration_keys(sampling, state.iteration)
  drafts_BxK, q_BxKxV, draft_cache = drafter(state.history_BxS, lengths_B, state.draft_cache,
                                             keys_B, sampling)
  last_B = state.history_BxS[rows_B, lengths_B - 1]
  tokens_BxT = jnp.concatenate([last_B[:, None], drafts_BxK], axis=1)
  positions_BxT = lengths_B[:, None] - 1 + jnp.arange(k + 1)
  logits_BxTxV, target_cache = target_logits(tokens_BxT, positions_BxT, state.target_cache)
  accepted_B, next_B = accept(logits_BxTxV, drafts_BxK, q_BxKxV, sampling, keys_B)

  # Emitted: accepted drafts, then the target's token; cut at max_tokens and the first stop.
  index_T = jnp.arange(k + 1)
  padded_BxT = jnp.concatenate([drafts_BxK, next_B[:, None]], axis=1)
  emitted_BxT = jnp.where(index_T < accepted_B[:, None], padded_BxT, next_B[:, None])
  count_B = jnp.minimum(accepted_B + 1, sampling.max_tokens - state.num_generated_B)
  is_stop_BxT = sampling.stop_mask_BxV[rows_B[:, None], emitted_BxT] & (index_T < count_B[:, None])
  hit_stop_B = jnp.any(is_stop_BxT, axis=-1)
  count_B = jnp.where(hit_stop_B, jnp.argmax(is_stop_BxT, axis=-1) + 1, count_B)
  count_B = jnp.where(active_B, count_B, 0)

  log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  emitted_logprobs_BxT = jnp.take_along_axis(log_probs_BxTxV, emitted_BxT[..., None], -1)[..., 0]
  write_BxT = jnp.where(index_T < count_B[:, None], lengths_B[:, None] + index_T, slots)
  history_BxS = state.history_BxS.at[rows_B[:, None], write_BxT].set(emitted_BxT, mode="drop")
  logprobs_BxS = state.logprobs_BxS.at[rows_B[:, None], write_BxT].set(emitted_logprobs_BxT,
                                                                       mode="drop")
  num_generated_B = state.num_generated_B + count_B
  done_B = state.done_B | hit_stop_B | (num_generated_B >= sampling.max_tokens)
  as_int = lambda x: x.astype(jnp.int32)
  return state.replace(
      target_cache=target_cache, draft_cache=draft_cache, iteration=state.iteration + 1,
      history_BxS=history_BxS, logprobs_BxS=logprobs_BxS, lengths_B=lengths_B + count_B,
      num_generated_B=num_generated_B, done_B=done_B,
      drafted_B=state.drafted_B + k * as_int(active_B),
      accepted_B=state.accepted_B + jnp.where(active_B, accepted_B, 0),
      forwards_B=state.forwards_B + as_int(active_B))


def decode(target_logits: TargetLogits, drafter: Drafter, state: SpecState,
           sampling: SamplingArrays, k: int) -> SpecState:
  """Iterates `step` until every row is done."""
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B),
                            lambda s: step(target_logits, drafter, s, sampling, k), state)


# ----------------------------------------------------------------------------- drafters


def ngram_drafter(k: int, ngram_max: int, ngram_min: int) -> Drafter:
  """Prompt lookup: the k tokens after the most recent earlier match of the last n tokens.

  The longest n in [ngram_min, ngram_max] with a match wins. Proposals past the known tokens,
  and rows without any match, repeat the last token. q is one-hot: the drafts are certain.
  """

  def draft(history_BxS, lengths_B, draft_cache, keys_B, sampling):
    del keys_B
    batch, slots = history_BxS.shape
    rows_B, j_S = jnp.arange(batch), jnp.arange(slots)
    start_B = jnp.full((batch,), -1, jnp.int32)  # where the continuation starts; -1: no match
    for n in range(ngram_min, ngram_max + 1):  # longer matches, found later, take precedence
      suffix_BxN = history_BxS[rows_B[:, None],
                               jnp.maximum(lengths_B[:, None] - n + jnp.arange(n), 0)]
      match_BxS = (j_S[None] + n < lengths_B[:, None]) & (lengths_B[:, None] >= n)
      for o in range(n):  # the window starting at j equals the suffix
        match_BxS &= jnp.roll(history_BxS, -o, axis=1) == suffix_BxN[:, o:o + 1]
      latest_B = jnp.max(jnp.where(match_BxS, j_S[None], -1), axis=-1)
      start_B = jnp.where(latest_B >= 0, latest_B + n, start_B)
    index_BxK = start_B[:, None] + jnp.arange(k)
    known_BxK = (start_B[:, None] >= 0) & (index_BxK < lengths_B[:, None])
    last_B = history_BxS[rows_B, lengths_B - 1]
    found_BxK = history_BxS[rows_B[:, None], jnp.clip(index_BxK, 0, slots - 1)]
    drafts_BxK = jnp.where(known_BxK, found_BxK, last_B[:, None])
    vocab = sampling.stop_mask_BxV.shape[-1]
    return drafts_BxK, jax.nn.one_hot(drafts_BxK, vocab, dtype=jnp.float32), draft_cache

  return draft


def _draft_choice(logits_BxV, sampling: SamplingArrays, keys_B):
  """A draft token per row (argmax for greedy rows) and the distribution it was drawn from."""
  filtered_BxV = filtered_logits(logits_BxV, sampling)
  drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
  greedy_B = greedy_tokens(logits_BxV)
  tokens_B = jnp.where(sampling.temperature > 0, drawn_B, greedy_B)
  return tokens_B, jax.nn.softmax(filtered_BxV, axis=-1)


def model_drafter(params, config, k: int) -> Drafter:
  """Autoregressive drafts from a jinfer model with its own KV cache (by position).

  Its first forward re-feeds the previous token with the last one (T=2): the previous token may
  be a bonus or corrected token the drafter never saw, and re-writing a position it did see
  stores the same K/V. Positions past the accepted prefix are overwritten in later iterations.
  """

  def draft(history_BxS, lengths_B, cache, keys_B, sampling):
    rows_B = jnp.arange(history_BxS.shape[0])
    lengths_B = jnp.maximum(lengths_B, 2)  # only padding rows (done from the start) have 1
    positions_Bx2 = lengths_B[:, None] + jnp.arange(-2, 0)
    tokens_Bx2 = history_BxS[rows_B[:, None], positions_Bx2]
    logits_Bx2xV, cache = llama.forward(params, config, tokens_Bx2, positions_Bx2, cache)
    key_at = lambda i: jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)
    first_B, first_q_BxV = _draft_choice(logits_Bx2xV[:, -1], sampling, key_at(0))

    def next_draft(carry, i):
      token_B, cache = carry
      logits_Bx1xV, cache = llama.forward(params, config, token_B[:, None],
                                          (lengths_B + i - 1)[:, None], cache)
      token_B, q_BxV = _draft_choice(logits_Bx1xV[:, 0], sampling, key_at(i))
      return (token_B, cache), (token_B, q_BxV)

    (_, cache), (rest_KxB, rest_q_KxBxV) = jax.lax.scan(next_draft, (first_B, cache),
                                                       jnp.arange(1, k))
    drafts_BxK = jnp.concatenate([first_B[:, None], rest_KxB.T], axis=1)
    q_BxKxV = jnp.concatenate([first_q_BxV[:, None], jnp.swapaxes(rest_q_KxBxV, 0, 1)], axis=1)
    return drafts_BxK, q_BxKxV, cache

  return draft


def target_logits_fn(params, config) -> TargetLogits:
  """The target as the loop sees it: T tokens per row at per-row positions, through the cache."""
  return lambda tokens_BxT, positions_BxT, cache: llama.forward(params, config, tokens_BxT,
                                                                positions_BxT, cache)


# ----------------------------------------------------------------------------- compiled pieces


@dataclasses.dataclass(frozen=True)
class _Static:
  """The hashable part of a SpeculativeConfig, plus the draft model's config."""

  method: str
  k: int
  ngram_max: int
  ngram_min: int
  draft_config: Any  # LlamaConfig or None (ngram)


def _drafter(draft_params, static: _Static) -> Drafter:
  """The drafter `static` names; draft_params are the draft model's or the target's first layers."""
  if static.method == "ngram":
    return ngram_drafter(static.k, static.ngram_max, static.ngram_min)
  return model_drafter(draft_params, static.draft_config, static.k)


def _prefill(params, draft_params, prompts_BxT, prompt_lens_B, sampling, done_B, *, config,
             static: _Static, cache_len: int, cache_dtype, capacity: int) -> SpecState:
  """Prefills the target (and the draft model's cache) and samples each row's first token.

  Both caches are `cache_dtype` (the target model's; int8 quantizes them)."""
  logits_BxV, target_cache = prefill_logits(params, config, prompts_BxT, prompt_lens_B, cache_len,
                                            cache_dtype)
  draft_cache = ()
  if static.draft_config is not None:
    draft_cache = KVCache.init(static.draft_config, prompts_BxT.shape[0], cache_len, cache_dtype)
    positions_BxT = jnp.broadcast_to(jnp.arange(prompts_BxT.shape[1], dtype=jnp.int32),
                                     prompts_BxT.shape)
    _, draft_cache = llama.hidden_states(draft_params, static.draft_config, prompts_BxT,
                                         positions_BxT, draft_cache)
  return sharding.host_readable(init_state(target_cache, draft_cache, prompts_BxT,
                                           prompt_lens_B, logits_BxV, sampling, done_B,
                                           capacity, static.k))


def _decode(params, draft_params, state, sampling, *, config, static: _Static) -> SpecState:
  """The whole speculative loop for real models, as one program."""
  return sharding.host_readable(decode(target_logits_fn(params, config),
                                       _drafter(draft_params, static), state, sampling, static.k))


_PREFILL = jax.jit(_prefill, static_argnames=("config", "static", "cache_len", "cache_dtype",
                                             "capacity"))
_DECODE = jax.jit(_decode, static_argnames=("config", "static"), donate_argnames=("state",))


# ----------------------------------------------------------------------------- requests

# Each would need the processors applied per draft position (and q adjusted to match).
_UNSUPPORTED = (
    ("n > 1", lambda p: p.n != 1),
    ("min_tokens", lambda p: p.min_tokens > 0),
    ("repetition_penalty", lambda p: p.repetition_penalty != 1.0),
    ("frequency_penalty", lambda p: p.frequency_penalty != 0.0),
    ("presence_penalty", lambda p: p.presence_penalty != 0.0),
    ("logit_bias", lambda p: bool(p.logit_bias)),
    ("bad_words", lambda p: bool(getattr(p, "bad_words", ()))),
    ("allowed_token_ids", lambda p: p.allowed_token_ids is not None),
    ("logprobs", lambda p: p.logprobs is not None),
    ("logprobs_mode='processed'", lambda p: p.logprobs_mode != "raw"),
)


def _draft_params(model, spec: SpeculativeConfig):
  """(draft params, draft config) for the model drafters; (None, None) for ngram."""
  if spec.method == "draft_model":
    draft = spec.draft_model
    check_request(draft.config.vocab_size == model.config.vocab_size,
                  f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from "
                  f"the target's ({model.config.vocab_size}); use a draft model sharing the "
                  "tokenizer.")
    draft_vocab = getattr(draft.tokenizer, "vocab_size", None)
    target_vocab = getattr(model.tokenizer, "vocab_size", None)
    check_request(draft_vocab == target_vocab,
                  f"the draft tokenizer has {draft_vocab} tokens, the target's {target_vocab}; "
                  "use a draft model sharing the tokenizer.")
    if model.mesh is not None:  # the draft runs on the target's mesh too
      draft = draft.shard(model.mesh)
    return draft.params, draft.config
  if spec.method == "self":
    check_request(spec.draft_layers < model.config.n_layers,
                  f"draft_layers must be below the target's {model.config.n_layers} layers, got "
                  f"{spec.draft_layers}.")
    config = dataclasses.replace(model.config, n_layers=spec.draft_layers)
    return {**model.params, "layers": model.params["layers"][:spec.draft_layers]}, config
  return None, None


def check_supported(params_list, spec: SpeculativeConfig) -> None:
  """Rejects what speculative decoding cannot (yet) do exactly."""
  check_request(isinstance(spec, SpeculativeConfig),
                f"speculative must be a SpeculativeConfig, got {type(spec).__name__}.")
  for p in params_list:
    for name, unsupported in _UNSUPPORTED:
      check_request(not unsupported(p), f"{name} is not supported with speculative decoding "
                                        f"yet; drop {name} or speculative=.")


def generate_with_stats(model, prompts, params, spec: SpeculativeConfig):
  """`generate` with speculative decoding; stats include acceptance and target forwards."""
  stats = GenerationStats()
  count = len(validation.prompts(prompts, model.config.vocab_size))
  check_supported(per_prompt_params(params, count), spec)
  draft_params, draft_config = _draft_params(model, spec)
  b = prepare_batch(model, prompts, params)
  static = _Static(spec.method, spec.num_draft_tokens, spec.ngram_max, spec.ngram_min,
                   draft_config)
  state = _run_prefill(model, draft_params, b, static, stats)
  real = len(b.rows)
  first = int(state.num_generated_B[:real].sum())
  state = _run_decode(model, draft_params, b, state, static, stats)
  stats.generated_tokens += int(state.num_generated_B[:real].sum()) - first
  stats.draft_tokens += int(state.drafted_B[:real].sum())
  stats.accepted_tokens += int(state.accepted_B[:real].sum())
  stats.target_forwards += int(state.forwards_B[:real].sum())
  return [_completion(model, b, state, i) for i in range(real)], stats


def _run_prefill(model, draft_params, b, static: _Static, stats: GenerationStats) -> SpecState:
  # n == 1, so rows are prompts (padding rows repeat prompt 0 and start done).
  prompts_BxT = b.tokens_PxT[b.row_prompt_B]
  cache_len = prompts_BxT.shape[1] + b.capacity + static.k + 1
  args = (model.params, draft_params, prompts_BxT, b.prompt_lens_P[b.row_prompt_B], b.sampling,
          b.done_B)
  static_args = dict(config=model.config, static=static, cache_len=cache_len,
                     cache_dtype=jnp.dtype(model.cache_dtype), capacity=b.capacity)
  state, seconds = COMPILED.run(_PREFILL, args, static_args, stats, model.mesh)
  stats.prefill_s += seconds
  stats.prompt_tokens += int(b.prompt_lens_P[:len(b.prompt_ids)].sum())
  return state


def _run_decode(model, draft_params, b, state, static: _Static,
                stats: GenerationStats) -> SpecState:
  args = (model.params, draft_params, state, b.sampling)
  state, seconds = COMPILED.run(_DECODE, args, dict(config=model.config, static=static), stats,
                                model.mesh)
  stats.decode_s += seconds
  return state


def _completion(model, b, state: SpecState, i: int) -> Completion:
  row = b.rows[i]
  start, count = int(state.prompt_lens_B[i]), int(state.num_generated_B[i])
  ids = np.asarray(state.history_BxS[i, start:start + count]).tolist()
  text = SequenceText(model.tokenizer, row.params.stop)
  text.push(ids)  # stop strings are found and trimmed here, after decoding
  ids = ids[:text.num_tokens]
  body = text.take(final=True)
  reason, stop_reason = finish_reason(row, ids, text)
  return Completion(
      text=body, token_ids=ids,
      logprobs=np.asarray(state.logprobs_BxS[i, start:start + len(ids)]).tolist(),
      finish_reason=reason, prompt_token_ids=b.prompt_ids[row.prompt], stop_reason=stop_reason,
      index=row.index)
