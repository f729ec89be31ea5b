"""`generate` and `generate_stream`: batch prompts of any lengths through one compiled loop.

Shapes are bucketed (batch, prompt length and generated-token capacity rounded up to powers of
two) so a handful of compiled programs serve every request; per-row settings are traced arrays.
A prompt asking for n samples is prefilled once; its n rows share that prefill's KV cache.

`model.attention_impl` picks the cache: "xla" (the default) a contiguous `KVCache`; "pallas" a
`PagedKVCache` whose decode steps run the Pallas paged-attention kernel (prefill gathers pages
and uses the XLA math). Every row gets its own pages (no sharing), filled by copying its
prompt's pages after the prefill. Beam search and speculative decoding keep the contiguous cache.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cache.kv_cache import KVCache
from jinfer.cache.page_allocator import PageAllocator, page_table_array, pages_for
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.decoding import loop
from jinfer.decoding.sampling import SamplingArrays, SamplingParams
from jinfer.errors import InvalidRequestError
from jinfer.models import llama

Prompt = Union[str, Sequence[int]]
PAGE_SIZE = 16  # tokens per KV page (attention_impl="pallas"); prompt buckets are multiples of it


@dataclasses.dataclass
class Completion:
  """One finished sequence.

  `finish_reason` is 'stop' (a stop token or stop string) or 'length'; `stop_reason` is the stop
  string or stop token id that ended it (None for EOS or length). `logprobs[i]` is the
  log-probability of `token_ids[i]`, and `top_logprobs[i]` the `SamplingParams.logprobs` most
  likely tokens at that step ({token id: log-probability}), both under the distribution that
  `logprobs_mode` names. `index` tells apart the n samples of one prompt.
  """

  text: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: str
  prompt_token_ids: list[int]
  stop_reason: Union[int, str, None] = None
  top_logprobs: Optional[list[dict[int, float]]] = None
  index: int = 0


@dataclasses.dataclass
class StreamDelta:
  """New output of sequence `index` (its position in `generate`'s result) since the last delta."""

  index: int
  text: str
  token_ids: list[int]
  finish_reason: Optional[str] = None  # set on the last delta of a sequence
  stop_reason: Union[int, str, None] = None


@dataclasses.dataclass
class GenerationStats:
  compile_s: float = 0.0
  prefill_s: float = 0.0
  decode_s: float = 0.0
  prompt_tokens: int = 0
  generated_tokens: int = 0  # excludes each sequence's first token, which prefill produces
  # Speculative decoding only (zero otherwise): drafts proposed, drafts the target accepted, and
  # target forwards in the decode loop, summed over sequences.
  draft_tokens: int = 0
  accepted_tokens: int = 0
  target_forwards: int = 0

  @property
  def decode_tokens_per_s(self) -> float:
    return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")

  @property
  def acceptance_rate(self) -> float:
    return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")

  @property
  def tokens_per_target_forward(self) -> float:
    """Generated tokens (past the first) per decode-loop target forward."""
    return (self.generated_tokens / self.target_forwards if self.target_forwards
            else float("nan"))


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


# ----------------------------------------------------------------------------- compiled pieces


def prefill_logits(params, config, tokens_BxT: jax.Array, prompt_lens_B: jax.Array,
                   cache_len: int) -> tuple[jax.Array, KVCache]:
  """Runs the padded prompts once; returns each prompt's last-position logits [B, V] and cache."""
  cache = KVCache.init(config, tokens_BxT.shape[0], cache_len, params["embed"].dtype)
  return _prompt_logits(params, config, tokens_BxT, prompt_lens_B, cache)


def _prompt_logits(params, config, tokens_BxT, prompt_lens_B, cache):
  """Writes the padded prompts into `cache`; returns last-position logits [B, V] and the cache."""
  batch, length = tokens_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  h_BxTxD, cache = llama.hidden_states(params, config, tokens_BxT, positions_BxT, cache)
  last_Bx1xD = jnp.take_along_axis(h_BxTxD, (prompt_lens_B - 1)[:, None, None], axis=1)
  return llama.logits_from_hidden(params, config, last_Bx1xD)[:, 0], cache


def decode_step_fn(params, config) -> loop.TokensToLogits:
  """The model as decode loops see it: one new token per row, through the cache."""
  def tokens_to_logits(tokens_B, positions_B, cache):
    logits, cache = llama.forward(params, config, tokens_B[:, None], positions_B[:, None], cache)
    return logits[:, 0], cache

  return tokens_to_logits


def _prefill(params, tokens_PxT, prompt_lens_P, row_prompt_B, sampling, done_B, *, config,
             cache_len, capacity, num_top_logprobs):
  """Runs the P distinct prompts once, then gives each of the B rows its prompt's cache."""
  logits_PxV, cache = prefill_logits(params, config, tokens_PxT, prompt_lens_P, cache_len)
  cache = jax.tree.map(lambda x: x[row_prompt_B], cache)
  return _init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B, logits_PxV, cache, sampling,
                    done_B, capacity, num_top_logprobs)


def _prefill_paged(params, tokens_PxT, prompt_lens_P, row_prompt_B, sampling, done_B,
                   prompt_tables_PxM, tables_BxM, *, config, capacity, num_top_logprobs):
  """`_prefill` into a paged cache (attention_impl="pallas").

  Prompt p writes the pages of `prompt_tables_PxM[p]` (its first row's); every other row then
  gets a copy of its prompt's pages in its own table.
  """
  batch, max_pages = tables_BxM.shape
  cache = PagedKVCache.init(config, batch * max_pages, PAGE_SIZE, tokens_PxT.shape[0], max_pages,
                            params["embed"].dtype, attention_impl="pallas")
  cache = cache.with_page_tables(prompt_tables_PxM, jnp.zeros_like(prompt_lens_P))
  logits_PxV, cache = _prompt_logits(params, config, tokens_PxT, prompt_lens_P, cache)
  prompt_pages = pages_for(tokens_PxT.shape[1], PAGE_SIZE)
  # A prompt's first row copies onto itself (a no-op); no destination is another copy's source.
  cache = cache.copy_pages(prompt_tables_PxM[row_prompt_B, :prompt_pages],
                           tables_BxM[:, :prompt_pages])
  cache = cache.with_page_tables(tables_BxM, prompt_lens_P[row_prompt_B])
  return _init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B, logits_PxV, cache, sampling,
                    done_B, capacity, num_top_logprobs)


def _init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B, logits_PxV, cache_B, sampling,
               done_B, capacity, num_top_logprobs):
  """The decode state of the B rows, each starting from its prompt's logits and cache rows."""
  num_prompts, length = tokens_PxT.shape
  in_prompt_PxT = jnp.arange(length) < prompt_lens_P[:, None]
  prompt_mask_PxV = jnp.zeros((num_prompts, config.vocab_size), bool).at[
      jnp.arange(num_prompts)[:, None], jnp.where(in_prompt_PxT, tokens_PxT, config.vocab_size)
  ].set(True, mode="drop")
  return loop.init_state(cache_B, prompt_lens_P[row_prompt_B], prompt_mask_PxV[row_prompt_B],
                         capacity, num_top_logprobs, logits_PxV[row_prompt_B], sampling, done_B)


def _decode(params, state, sampling, until_step, *, config):
  return loop.decode(decode_step_fn(params, config), state, sampling, until_step)


_PREFILL = jax.jit(_prefill,
                   static_argnames=("config", "cache_len", "capacity", "num_top_logprobs"))
_PREFILL_PAGED = jax.jit(_prefill_paged,
                         static_argnames=("config", "capacity", "num_top_logprobs"))
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

  def run(self, jitted, args, static: dict, stats: GenerationStats):
    """Compiles if needed, then runs; returns (outputs, seconds the run took)."""
    program = self.get(jitted, args, static, stats)
    start = time.perf_counter()
    out = jax.block_until_ready(program(*args))
    return out, time.perf_counter() - start


_COMPILED = _CompileCache()


# ----------------------------------------------------------------------------- request handling


@dataclasses.dataclass
class _Row:
  """One generated sequence: sample `index` of prompt `prompt`."""

  prompt: int
  index: int
  params: SamplingParams
  stop_ids: list[int]


@dataclasses.dataclass
class _Batch:
  prompt_ids: list[list[int]]
  rows: list[_Row]  # real rows; the batch is padded past them with rows that start done
  tokens_PxT: np.ndarray
  prompt_lens_P: np.ndarray
  row_prompt_B: np.ndarray
  sampling: SamplingArrays
  done_B: np.ndarray
  capacity: int
  num_top_logprobs: int
  # attention_impl="pallas" only: each row's page table [B, M], and each prompt's [P, M] (its
  # first row's table; NO_PAGE for padding prompts) that the prefill writes.
  tables_BxM: Optional[np.ndarray] = None
  prompt_tables_PxM: Optional[np.ndarray] = None


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


def _bad_word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
  """Each bad word's token ids as vLLM forms them: the word alone and after a space."""
  variants = {tuple(tokenizer.encode(text, add_bos=False)) for word in words
              for text in (word, " " + word.lstrip())}
  return [list(ids) for ids in sorted(variants) if ids]


def _prepare(model, prompts, params) -> _Batch:
  prompt_ids = _encode_prompts(model, prompts)
  params = _per_prompt_params(params, len(prompt_ids))
  for i, (ids, p) in enumerate(zip(prompt_ids, params)):
    p.check_vocab(model.config.vocab_size)
    if len(ids) + p.max_tokens > model.config.max_seq_len:
      raise InvalidRequestError(
          f"prompt {i} has {len(ids)} tokens and asks for max_tokens={p.max_tokens}, more than "
          f"the model's context of {model.config.max_seq_len}; shorten the prompt or max_tokens.")
  rows = [_Row(i, j, p, _stop_ids(model, p)) for i, p in enumerate(params) for j in range(p.n)]
  num_prompts, batch = bucket(len(prompt_ids), minimum=1), bucket(len(rows), minimum=1)
  tokens_PxT = np.zeros((num_prompts, bucket(max(map(len, prompt_ids)))), np.int32)
  prompt_lens_P = np.ones((num_prompts,), np.int32)
  for i, ids in enumerate(prompt_ids):
    tokens_PxT[i, :len(ids)] = ids
    prompt_lens_P[i] = len(ids)
  padding = _Row(0, 0, SamplingParams(max_tokens=1, temperature=0.0), [])
  padded = rows + [padding] * (batch - len(rows))
  seeds = [r.params.seed if r.params.seed is not None else np.random.randint(0, 2**31)
           for r in padded]
  sampling = SamplingArrays.from_params(
      [r.params for r in padded], seeds, [r.stop_ids for r in padded], model.config.vocab_size,
      sample_index=[r.index for r in padded],
      bad_word_ids=[_bad_word_ids(model.tokenizer, r.params.bad_words) for r in padded])
  b = _Batch(prompt_ids, rows, tokens_PxT, prompt_lens_P,
             np.asarray([r.prompt for r in padded], np.int32), sampling,
             np.arange(batch) >= len(rows), bucket(max(p.max_tokens for p in params)),
             max(p.logprobs or 0 for p in params))
  if model.attention_impl == "pallas":
    b.tables_BxM, b.prompt_tables_PxM = _page_tables(
        b.row_prompt_B, num_prompts, pages_for(tokens_PxT.shape[1] + b.capacity, PAGE_SIZE))
  return b


def _page_tables(row_prompt_B: np.ndarray, num_prompts: int,
                 max_pages: int) -> tuple[np.ndarray, np.ndarray]:
  """(row tables [B, M], prompt tables [P, M]): M private pages per row, from one pool.

  Rows do not share pages (no copy-on-write in the decode loop); a prompt's prefill writes into
  its first row's pages, which the other rows then copy.
  """
  allocator = PageAllocator(len(row_prompt_B) * max_pages)
  tables = [allocator.allocate(max_pages) for _ in row_prompt_B]
  first_row = {}
  for row, prompt in enumerate(row_prompt_B.tolist()):
    first_row.setdefault(prompt, row)
  prompt_tables = [tables[first_row[p]] if p in first_row else [] for p in range(num_prompts)]
  return page_table_array(tables, max_pages), page_table_array(prompt_tables, max_pages)


def _run_prefill(model, b: _Batch, stats: GenerationStats) -> loop.DecodeState:
  args = (model.params, b.tokens_PxT, b.prompt_lens_P, b.row_prompt_B, b.sampling, b.done_B)
  static = dict(config=model.config, capacity=b.capacity, num_top_logprobs=b.num_top_logprobs)
  if b.tables_BxM is None:
    jitted, static["cache_len"] = _PREFILL, b.tokens_PxT.shape[1] + b.capacity
  else:
    jitted, args = _PREFILL_PAGED, args + (b.prompt_tables_PxM, b.tables_BxM)
  state, seconds = _COMPILED.run(jitted, args, static, stats)
  stats.prefill_s += seconds
  stats.prompt_tokens += int(b.prompt_lens_P[:len(b.prompt_ids)].sum())
  return state


def _run_decode(model, b: _Batch, state, until_step: int, stats) -> loop.DecodeState:
  args = (model.params, state, b.sampling, jnp.int32(until_step))
  generated_before = int(state.num_generated_B[:len(b.rows)].sum())
  state, seconds = _COMPILED.run(_DECODE, args, dict(config=model.config), stats)
  stats.decode_s += seconds
  stats.generated_tokens += int(state.num_generated_B[:len(b.rows)].sum()) - generated_before
  return state


class _RowText:
  """A row's text as its tokens arrive: stable increments, with stop strings found and cut."""

  def __init__(self, tokenizer, stops: Sequence[str]):
    from jinfer.tokenizers import IncrementalDetokenizer  # pylint: disable=g-import-not-at-top
    self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    self._stops = stops
    self._hold = max(map(len, stops), default=1) - 1  # a stop string may still be completing
    self.text = ""
    self.num_tokens = 0
    self.stop: Optional[tuple[int, str]] = None  # (where the stop string starts, which one)
    self._emitted = 0

  def push(self, token_ids: Sequence[int]) -> None:
    for token in token_ids:
      if self.stop is not None:
        return
      self.num_tokens += 1
      self._extend(self._detokenizer.push(token))

  def _extend(self, piece: str) -> None:
    start = max(0, len(self.text) - self._hold)
    self.text += piece
    found = [(self.text.find(s, start), s) for s in self._stops if self.text.find(s, start) >= 0]
    if found:
      self.stop = min(found)

  def take(self, final: bool) -> str:
    """The text not returned yet that no later token can change (all of it when final)."""
    if final and self.stop is None:
      self._extend(self._detokenizer.flush())
    if self.stop is not None:
      end = self.stop[0]
    else:
      end = len(self.text) if final else len(self.text) - self._hold
    out = self.text[self._emitted:max(end, self._emitted)]
    self._emitted = max(end, self._emitted)
    return out


def _finish(row: _Row, token_ids: list[int], text: _RowText) -> tuple[str, Union[int, str, None]]:
  """(finish_reason, stop_reason) of a finished row."""
  if text.stop is not None:
    return "stop", text.stop[1]
  if token_ids and token_ids[-1] in row.stop_ids:
    return "stop", (token_ids[-1] if token_ids[-1] in row.params.stop_token_ids else None)
  return "length", None


def _decode_all(model, b: _Batch, state, texts: list[_RowText], stats, steps_per_chunk: int):
  """Yields the state after each chunk of steps, ending rows whose text hit a stop string."""
  chunk = steps_per_chunk if any(r.params.stop for r in b.rows) else b.capacity
  seen = [0] * len(b.rows)
  while True:
    tokens_BxL, num_generated_B = np.asarray(state.tokens_BxL), np.asarray(state.num_generated_B)
    for i, text in enumerate(texts):
      text.push(tokens_BxL[i, seen[i]:num_generated_B[i]].tolist())
      seen[i] = num_generated_B[i]
    done_B = np.asarray(state.done_B).copy()
    stopped = [i for i, t in enumerate(texts) if t.stop is not None and not done_B[i]]
    if stopped:
      done_B[stopped] = True
      state = state.replace(done_B=jnp.asarray(done_B))
    yield state
    if done_B.all():
      return
    state = _run_decode(model, b, state, int(state.step) + chunk, stats)


def _completion(model, b: _Batch, state, i: int, text: _RowText) -> Completion:
  row = b.rows[i]
  count = text.num_tokens
  ids = np.asarray(state.tokens_BxL[i, :count]).tolist()
  top = None
  if row.params.logprobs is not None:
    top_ids, top_values = np.asarray(state.top_ids_BxLxN[i]), np.asarray(state.top_logprobs_BxLxN[i])
    top = [dict(zip(top_ids[t, :row.params.logprobs].tolist(),
                    top_values[t, :row.params.logprobs].tolist())) for t in range(count)]
  body = text.take(final=True)
  reason, stop_reason = _finish(row, ids, text)
  return Completion(text=body, token_ids=ids,
                    logprobs=np.asarray(state.logprobs_BxL[i, :count]).tolist(),
                    finish_reason=reason, prompt_token_ids=b.prompt_ids[row.prompt],
                    stop_reason=stop_reason, top_logprobs=top, index=row.index)


def generate_with_stats(model, prompts: Sequence[Prompt],
                        params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                        steps_per_chunk: int = 16, speculative=None,
                        ) -> tuple[list[Completion], GenerationStats]:
  """`generate`, also returning compile, prefill and decode timings (and acceptance stats)."""
  if speculative is not None:
    from jinfer.decoding import speculative as spec  # pylint: disable=g-import-not-at-top
    return spec.generate_with_stats(model, prompts, params, speculative)
  stats = GenerationStats()
  b = _prepare(model, prompts, params)
  texts = [_RowText(model.tokenizer, r.params.stop) for r in b.rows]
  state = _run_prefill(model, b, stats)
  for state in _decode_all(model, b, state, texts, stats, steps_per_chunk):
    pass
  return [_completion(model, b, state, i, text) for i, text in enumerate(texts)], stats


def generate(model, prompts: Sequence[Prompt],
             params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
             speculative=None) -> list[Completion]:
  """Completes each prompt (a string or a list of token ids) with its SamplingParams.

  Returns one Completion per sequence: prompt order, and a prompt's n samples next to each
  other (`Completion.index` numbers them). `speculative=jinfer.SpeculativeConfig(...)` decodes
  speculatively (same output distribution; greedy output equals plain greedy decoding).
  """
  return generate_with_stats(model, prompts, params, speculative=speculative)[0]


def generate_stream(model, prompts: Sequence[Prompt],
                    params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                    steps_per_chunk: int = 8) -> Iterator[StreamDelta]:
  """Yields StreamDeltas as tokens are produced, every `steps_per_chunk` decode steps.

  The same compiled loop as `generate` runs `steps_per_chunk` steps per call, so streaming costs
  one host round trip per chunk, not per token. Text never ends in half a UTF-8 character, and
  text that may be the start of a stop string is held back until it is known not to be.
  `StreamDelta.index` is the sequence's position in what `generate` would return.
  """
  stats = GenerationStats()
  b = _prepare(model, prompts, params)
  texts = [_RowText(model.tokenizer, r.params.stop) for r in b.rows]
  sent = [0] * len(b.rows)
  finished = [False] * len(b.rows)
  state = _run_prefill(model, b, stats)
  for state in _decode_all(model, b, state, texts, stats, steps_per_chunk):
    tokens_BxL, done_B = np.asarray(state.tokens_BxL), np.asarray(state.done_B)
    for i, text in enumerate(texts):
      if finished[i]:
        continue
      new_ids = tokens_BxL[i, sent[i]:text.num_tokens].tolist()
      sent[i] = text.num_tokens
      piece = text.take(final=bool(done_B[i]))
      reason = stop_reason = None
      if done_B[i]:
        finished[i] = True
        reason, stop_reason = _finish(b.rows[i], tokens_BxL[i, :text.num_tokens].tolist(), text)
      if new_ids or piece or reason:
        yield StreamDelta(index=i, text=piece, token_ids=new_ids, finish_reason=reason,
                          stop_reason=stop_reason)
