"""`generate` and `generate_stream`: batch prompts of any lengths through one compiled loop.

Shapes are bucketed (batch, prompt length and generated-token capacity rounded up to powers of
two) so a handful of compiled programs serve every request; per-row settings are traced arrays.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cache.kv_cache import KVCache
from jinfer.decoding import loop
from jinfer.decoding.sampling import SamplingArrays, SamplingParams
from jinfer.errors import InvalidRequestError
from jinfer.models import llama

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class Completion:
  """One finished sequence. `finish_reason` is 'stop' (a stop/EOS token) or 'length'."""

  text: str
  token_ids: list[int]
  logprobs: list[float]  # log-probability of each generated token under the model
  finish_reason: str
  prompt_token_ids: list[int]


@dataclasses.dataclass
class StreamDelta:
  """New output of prompt `index` since the previous delta."""

  index: int
  text: str
  token_ids: list[int]
  finish_reason: Optional[str] = None  # set on the last delta of a sequence


@dataclasses.dataclass
class GenerationStats:
  compile_s: float = 0.0
  prefill_s: float = 0.0
  decode_s: float = 0.0
  prompt_tokens: int = 0
  generated_tokens: int = 0  # excludes the first token, which prefill produces

  @property
  def decode_tokens_per_s(self) -> float:
    return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


# ----------------------------------------------------------------------------- compiled pieces


def _prefill(params, tokens_BxT, prompt_lens_B, sampling, stop_ids_BxM, done_B, *, config,
             cache_len, capacity):
  batch, length = tokens_BxT.shape
  cache = KVCache.init(config, batch, cache_len, params["embed"].dtype)
  positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  h_BxTxD, cache = llama.hidden_states(params, config, tokens_BxT, positions_BxT, cache)
  last_BxD = jnp.take_along_axis(h_BxTxD, (prompt_lens_B - 1)[:, None, None], axis=1)
  logits_BxV = llama.logits_from_hidden(params, config, last_BxD)[:, 0]
  return loop.init_state(cache, prompt_lens_B, capacity, logits_BxV, sampling, stop_ids_BxM,
                         done_B)


def _decode(params, state, sampling, stop_ids_BxM, until_step, *, config):
  def tokens_to_logits(tokens_B, positions_B, cache):
    logits, cache = llama.forward(params, config, tokens_B[:, None], positions_B[:, None], cache)
    return logits[:, 0], cache

  return loop.decode(tokens_to_logits, state, sampling, stop_ids_BxM, until_step)


_PREFILL = jax.jit(_prefill, static_argnames=("config", "cache_len", "capacity"))
_DECODE = jax.jit(_decode, static_argnames=("config",), donate_argnames=("state",))


class _CompileCache:
  """Ahead-of-time compiled programs keyed by their static settings and input shapes."""

  def __init__(self):
    self._programs = {}

  def get(self, jitted, args, static: dict, stats: GenerationStats):
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), args)
    key = (id(jitted), tuple(sorted(static.items())), str(jax.tree.structure(args)), str(shapes))
    if key not in self._programs:
      start = time.perf_counter()
      self._programs[key] = jitted.lower(*args, **static).compile()
      stats.compile_s += time.perf_counter() - start
    return self._programs[key]


_COMPILED = _CompileCache()


# ----------------------------------------------------------------------------- request handling


@dataclasses.dataclass
class _Batch:
  prompt_ids: list[list[int]]
  params: list[SamplingParams]
  tokens_BxT: np.ndarray
  prompt_lens_B: np.ndarray
  sampling: SamplingArrays
  stop_ids_BxM: np.ndarray
  done_B: np.ndarray  # padding rows start done
  capacity: int


def _encode_prompts(model, prompts: Sequence[Prompt]) -> list[list[int]]:
  if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
    raise InvalidRequestError("prompts must be a list of prompts (strings or token-id lists); "
                              "wrap a single prompt in a list.")
  ids = [model.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
  for i, prompt_ids in enumerate(ids):
    if not prompt_ids:
      raise InvalidRequestError(f"prompt {i} is empty; give at least one token.")
    bad = [t for t in prompt_ids if not 0 <= t < model.config.vocab_size]
    if bad:
      raise InvalidRequestError(
          f"prompt {i} has token ids outside [0, {model.config.vocab_size}): {bad[:5]}.")
  return ids


def _per_prompt_params(params, count: int) -> list[SamplingParams]:
  if params is None:
    return [SamplingParams()] * count
  if isinstance(params, SamplingParams):
    return [params] * count
  params = list(params)
  if len(params) != count:
    raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts; "
                              "pass one for all prompts or exactly one per prompt.")
  return params


def _stop_ids(model, p: SamplingParams) -> list[int]:
  eos = [] if p.ignore_eos else sorted(model.tokenizer.eos_ids)
  return list(p.stop_token_ids) + eos


def _prepare(model, prompts, params) -> _Batch:
  prompt_ids = _encode_prompts(model, prompts)
  params = _per_prompt_params(params, len(prompt_ids))
  for i, (ids, p) in enumerate(zip(prompt_ids, params)):
    if len(ids) + p.max_tokens > model.config.max_seq_len:
      raise InvalidRequestError(
          f"prompt {i} has {len(ids)} tokens and asks for max_tokens={p.max_tokens}, more than "
          f"the model's context of {model.config.max_seq_len}; shorten the prompt or max_tokens.")
  count = len(prompt_ids)
  batch = bucket(count, minimum=1)
  length = bucket(max(len(ids) for ids in prompt_ids))
  tokens_BxT = np.zeros((batch, length), np.int32)
  prompt_lens_B = np.ones((batch,), np.int32)
  for i, ids in enumerate(prompt_ids):
    tokens_BxT[i, :len(ids)] = ids
    prompt_lens_B[i] = len(ids)
  padded = params + [SamplingParams(max_tokens=1, temperature=0.0)] * (batch - count)
  seeds = [p.seed if p.seed is not None else np.random.randint(0, 2**31) for p in padded]
  stops = [_stop_ids(model, p) for p in padded]
  stop_ids_BxM = np.full((batch, bucket(max(map(len, stops)), minimum=1)), -2, np.int32)
  for i, ids in enumerate(stops):
    stop_ids_BxM[i, :len(ids)] = ids
  return _Batch(prompt_ids, params, tokens_BxT, prompt_lens_B,
                SamplingArrays.from_params(padded, seeds), stop_ids_BxM,
                np.arange(batch) >= count, bucket(max(p.max_tokens for p in params)))


def _run_prefill(model, b: _Batch, stats: GenerationStats) -> loop.DecodeState:
  args = (model.params, b.tokens_BxT, b.prompt_lens_B, b.sampling, b.stop_ids_BxM, b.done_B)
  static = dict(config=model.config, cache_len=b.tokens_BxT.shape[1] + b.capacity,
                capacity=b.capacity)
  program = _COMPILED.get(_PREFILL, args, static, stats)
  start = time.perf_counter()
  state = jax.block_until_ready(program(*args))
  stats.prefill_s += time.perf_counter() - start
  stats.prompt_tokens += int(b.prompt_lens_B[:len(b.prompt_ids)].sum())
  return state


def _run_decode(model, b: _Batch, state, until_step: int, stats) -> loop.DecodeState:
  args = (model.params, state, b.sampling, b.stop_ids_BxM, jnp.int32(until_step))
  program = _COMPILED.get(_DECODE, args, dict(config=model.config), stats)
  generated_before = int(state.num_generated_B[:len(b.prompt_ids)].sum())
  start = time.perf_counter()
  state = jax.block_until_ready(program(*args))
  stats.decode_s += time.perf_counter() - start
  stats.generated_tokens += int(state.num_generated_B[:len(b.prompt_ids)].sum()) - generated_before
  return state


def _finish_reason(token_ids: list[int], stop_ids: list[int]) -> str:
  return "stop" if token_ids and token_ids[-1] in stop_ids else "length"


def generate_with_stats(model, prompts: Sequence[Prompt],
                        params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                        ) -> tuple[list[Completion], GenerationStats]:
  """`generate`, also returning compile, prefill and decode timings."""
  stats = GenerationStats()
  b = _prepare(model, prompts, params)
  state = _run_prefill(model, b, stats)
  state = _run_decode(model, b, state, b.capacity, stats)
  tokens_BxL = np.asarray(state.tokens_BxL)
  logprobs_BxL = np.asarray(state.logprobs_BxL)
  completions = []
  for i, (prompt_ids, p) in enumerate(zip(b.prompt_ids, b.params)):
    count = int(state.num_generated_B[i])
    ids = tokens_BxL[i, :count].tolist()
    completions.append(Completion(
        text=model.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
        logprobs=logprobs_BxL[i, :count].tolist(),
        finish_reason=_finish_reason(ids, _stop_ids(model, p)), prompt_token_ids=prompt_ids))
  return completions, stats


def generate(model, prompts: Sequence[Prompt],
             params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             ) -> list[Completion]:
  """Completes each prompt (a string or a list of token ids) with its SamplingParams."""
  return generate_with_stats(model, prompts, params)[0]


def generate_stream(model, prompts: Sequence[Prompt],
                    params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                    steps_per_chunk: int = 8) -> Iterator[StreamDelta]:
  """Yields StreamDeltas as tokens are produced, every `steps_per_chunk` decode steps.

  The same compiled loop as `generate` runs `steps_per_chunk` steps per call, so streaming costs
  one host round trip per chunk, not per token. Text never ends in half a UTF-8 character.
  """
  from jinfer.tokenizers import IncrementalDetokenizer  # pylint: disable=g-import-not-at-top

  stats = GenerationStats()
  b = _prepare(model, prompts, params)
  count = len(b.prompt_ids)
  detokenizers = [IncrementalDetokenizer(model.tokenizer, skip_special_tokens=True)
                  for _ in range(count)]
  emitted = [0] * count
  finished = [False] * count
  state = _run_prefill(model, b, stats)
  while True:
    tokens_BxL = np.asarray(state.tokens_BxL)
    num_generated = np.asarray(state.num_generated_B)
    done = np.asarray(state.done_B)
    for i in range(count):
      new_ids = tokens_BxL[i, emitted[i]:num_generated[i]].tolist()
      if finished[i] or not (new_ids or done[i]):
        continue
      text = "".join(detokenizers[i].push(t) for t in new_ids)
      emitted[i] += len(new_ids)
      reason = None
      if done[i]:
        text += detokenizers[i].flush()
        reason = _finish_reason(tokens_BxL[i, :emitted[i]].tolist(), _stop_ids(model, b.params[i]))
        finished[i] = True
      yield StreamDelta(index=i, text=text, token_ids=new_ids, finish_reason=reason)
    if all(finished):
      return
    state = _run_decode(model, b, state, int(state.step) + steps_per_chunk, stats)
