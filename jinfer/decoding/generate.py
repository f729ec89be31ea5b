"""`generate` and `generate_stream`: batch prompts of any lengths through one compiled loop.

Shapes are bucketed (batch, prompt length and generated-token capacity rounded up to powers of
two) so a handful of compiled programs serve every request; per-row settings are traced arrays.
A prompt asking for n samples is prefilled once; its n rows share that prefill's KV cache.

`model.attention_impl` picks the cache: "xla" (the default) a contiguous `KVCache`; "pallas" a
`PagedKVCache` of `model.page_size`-token pages whose decode steps run the Pallas paged-attention
kernel (prefill gathers pages and uses the XLA math). The n rows of a prompt share its pages
vLLM style: the prefill writes each prompt's pages once; pages the prompt fills are held by all
its rows (refcounted by a `PageAllocator`), and the page with the prompt's last partial page,
which decode writes into, is copied per row (copy-on-write); decode pages are private, so no
row ever writes a shared page. The pool holds the pages the batch uses (bucketed), not one
max-length table per row. `model.cache_dtype` sets the cache dtype (int8: quantized with
scales). Beam search and speculative decoding keep the contiguous cache.
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
from jinfer.models import llama
from jinfer.validation import Prompt, check_request
from jinfer import validation


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
                   cache_len: int, cache_dtype=None) -> tuple[jax.Array, KVCache]:
  """Runs the padded prompts once; returns each prompt's last-position logits [B, V] and cache.

  The cache is `cache_dtype` (static under jit; int8 quantizes it), by default the params'.
  """
  dtype = params["final_norm"].dtype if cache_dtype is None else cache_dtype
  cache = KVCache.init(config, tokens_BxT.shape[0], cache_len, dtype)
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
             cache_len, cache_dtype, capacity, num_top_logprobs):
  """Runs the P distinct prompts once, then gives each of the B rows its prompt's cache."""
  logits_PxV, cache = prefill_logits(params, config, tokens_PxT, prompt_lens_P, cache_len,
                                     cache_dtype)
  cache = jax.tree.map(lambda x: x[row_prompt_B], cache)
  return _init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B, logits_PxV, cache, sampling,
                    done_B, capacity, num_top_logprobs)


def _prefill_paged(params, tokens_PxT, prompt_lens_P, row_prompt_B, sampling, done_B,
                   prompt_tables_PxM, tables_BxM, copy_src_C, copy_dst_C, *, config, num_pages,
                   page_size, cache_dtype, capacity, num_top_logprobs):
  """`_prefill` into a paged cache (attention_impl="pallas") whose rows share prompt pages.

  Prompt p writes the pages of `prompt_tables_PxM[p]` once; then pages copy_src_C[i] are copied
  to copy_dst_C[i] (the partial last prompt page of rows that need their own), and the rows
  take their tables `tables_BxM` (see `_page_plan`).
  """
  cache = PagedKVCache.init(config, num_pages, page_size, tokens_PxT.shape[0],
                            tables_BxM.shape[1], cache_dtype, attention_impl="pallas")
  cache = cache.with_page_tables(prompt_tables_PxM, jnp.zeros_like(prompt_lens_P))
  logits_PxV, cache = _prompt_logits(params, config, tokens_PxT, prompt_lens_P, cache)
  cache = cache.copy_pages(copy_src_C, copy_dst_C)
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


_PREFILL = jax.jit(_prefill, static_argnames=("config", "cache_len", "cache_dtype", "capacity",
                                              "num_top_logprobs"))
_PREFILL_PAGED = jax.jit(_prefill_paged, static_argnames=(
    "config", "num_pages", "page_size", "cache_dtype", "capacity", "num_top_logprobs"))
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
  pages: Optional[_PagePlan] = None  # attention_impl="pallas" only


@dataclasses.dataclass
class _PagePlan:
  """Where a batch's paged cache keeps what (attention_impl="pallas"); see `_page_plan`.

  Prompt p's prefill writes the pages of prompt_tables_PxM[p] (NO_PAGE for padding prompts),
  then page copy_src_C[i] is copied to copy_dst_C[i] (C = B: at most one copy per row, padded
  with a page copied onto itself) and each row decodes through its table tables_BxM[b].
  """

  num_pages: int  # the pool
  prompt_tables_PxM: np.ndarray
  tables_BxM: np.ndarray
  copy_src_C: np.ndarray
  copy_dst_C: np.ndarray


def encode_prompts(model, prompts: Sequence[Prompt]) -> list[list[int]]:
  """Token ids of each prompt, checked (see `validation.prompts`)."""
  checked = validation.prompts(prompts, model.config.vocab_size)
  ids = [model.tokenizer.encode(p) if isinstance(p, str) else p for p in checked]
  for i, prompt_ids in enumerate(ids):
    check_request(bool(prompt_ids), f"prompt {i} encodes to no tokens; give some text.")
  return ids


def per_prompt_params(params, count: int) -> list[SamplingParams]:
  if params is None:
    return [SamplingParams()] * count
  if isinstance(params, SamplingParams):
    return [params] * count
  check_request(isinstance(params, Sequence) and all(isinstance(p, SamplingParams) for p in params),
                "params must be a SamplingParams or a list of them (one per prompt), got "
                f"{type(params).__name__}; build one with jinfer.SamplingParams(**fields).")
  check_request(len(params) == count, f"got {len(params)} SamplingParams for {count} prompts; "
                "pass one for all prompts or exactly one per prompt.")
  return list(params)


def _stop_ids(model, p: SamplingParams) -> list[int]:
  eos = [] if p.ignore_eos else sorted(model.tokenizer.eos_ids)
  return list(p.stop_token_ids) + eos


def _bad_word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
  """Each bad word's token ids as vLLM forms them: the word alone and after a space."""
  variants = {tuple(tokenizer.encode(text, add_bos=False)) for word in words
              for text in (word, " " + word.lstrip())}
  return [list(ids) for ids in sorted(variants) if ids]


def _prepare(model, prompts, params) -> _Batch:
  validation.model(model)
  prompt_ids = encode_prompts(model, prompts)
  params = per_prompt_params(params, len(prompt_ids))
  for i, (ids, p) in enumerate(zip(prompt_ids, params)):
    p.check_vocab(model.config.vocab_size)
    validation.fits_context(i, len(ids), p.max_tokens, model.config.max_seq_len)
  rows = [_Row(i, j, p, _stop_ids(model, p)) for i, p in enumerate(params) for j in range(p.n)]
  num_prompts, batch = bucket(len(prompt_ids), minimum=1), bucket(len(rows), minimum=1)
  tokens_PxT = np.zeros((num_prompts, _prompt_bucket(model, max(map(len, prompt_ids)))), np.int32)
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
    b.pages = _page_plan(b, model.page_size)
  return b


def _prompt_bucket(model, longest: int) -> int:
  """Padded prompt length: a power of two, and for the paged cache a whole number of pages."""
  length = bucket(longest)
  if model.attention_impl == "pallas":
    length = pages_for(length, model.page_size) * model.page_size
  return length


def _page_plan(b: _Batch, page_size: int) -> _PagePlan:
  """Page tables in which the rows of a prompt share its full pages, vLLM style.

  Each prompt gets the pages its tokens fill, written once by its prefill. Its rows fork that
  table (refcounts) and reserve what they will write: a partial last prompt page is copied
  (copy-on-write) for every row of the prompt but the last, which keeps the original, and
  decode pages are fresh. Full prompt pages are never written again, so they stay shared;
  padding rows get no pages (their writes are dropped). The pool is the pages used, rounded up
  to a power of two so that few programs compile.
  """
  length = b.tokens_PxT.shape[1]
  batch, max_pages = len(b.row_prompt_B), pages_for(length + b.capacity, page_size)
  allocator = PageAllocator(batch * max_pages)  # enough: every page ends up in some row's table
  prompt_tables = [allocator.allocate(pages_for(len(ids), page_size)) for ids in b.prompt_ids]
  forks = [allocator.fork(prompt_tables[row.prompt]) for row in b.rows]
  for table in prompt_tables:
    allocator.free(table)  # the rows hold every prompt page now
  tables, copies = [], []
  for row, table in zip(b.rows, forks):
    prompt_len = len(b.prompt_ids[row.prompt])
    table, copy = allocator.reserve(table, prompt_len, prompt_len + row.params.max_tokens,
                                    page_size)
    tables.append(table)
    copies += [copy] if copy else []
  # Prompt 0's first page is never a copy's destination: copying it onto itself changes nothing.
  no_op = prompt_tables[0][0]
  src_C, dst_C = np.asarray(copies + [(no_op, no_op)] * (batch - len(copies)), np.int32).T
  used = max(max(table) for table in tables) + 1
  padded = lambda held, count: page_table_array(held + [[]] * (count - len(held)), max_pages)
  return _PagePlan(num_pages=min(bucket(used, minimum=1), batch * max_pages),
                   prompt_tables_PxM=padded(prompt_tables, len(b.prompt_lens_P)),
                   tables_BxM=padded(tables, batch), copy_src_C=src_C, copy_dst_C=dst_C)


def _run_prefill(model, b: _Batch, stats: GenerationStats) -> loop.DecodeState:
  args = (model.params, b.tokens_PxT, b.prompt_lens_P, b.row_prompt_B, b.sampling, b.done_B)
  static = dict(config=model.config, cache_dtype=jnp.dtype(model.cache_dtype),
                capacity=b.capacity, num_top_logprobs=b.num_top_logprobs)
  if b.pages is None:
    jitted, static["cache_len"] = _PREFILL, b.tokens_PxT.shape[1] + b.capacity
  else:
    p = b.pages
    jitted = _PREFILL_PAGED
    args += (p.prompt_tables_PxM, p.tables_BxM, p.copy_src_C, p.copy_dst_C)
    static.update(num_pages=p.num_pages, page_size=model.page_size)
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


def _decode_all(model, b: _Batch, state, texts: list[_RowText], stats, chunk: int):
  """Yields the state after each `chunk` decode steps, ending rows whose text hit a stop
  string."""
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
  steps_per_chunk = validation.integer("steps_per_chunk", steps_per_chunk, low=1)
  stats = GenerationStats()
  b = _prepare(model, prompts, params)
  texts = [_RowText(model.tokenizer, r.params.stop) for r in b.rows]
  state = _run_prefill(model, b, stats)
  # Stop strings are found on the host between chunks; without any, one call runs to the end.
  chunk = min(steps_per_chunk, b.capacity) if any(r.params.stop for r in b.rows) else b.capacity
  for state in _decode_all(model, b, state, texts, stats, chunk):
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
  `StreamDelta.index` is the sequence's position in what `generate` would return. The request
  is checked when this is called, before the first delta is asked for.
  """
  # Checked here, so a bad request raises before iteration.
  steps_per_chunk = validation.integer("steps_per_chunk", steps_per_chunk, low=1)
  b = _prepare(model, prompts, params)
  return _stream(model, b, steps_per_chunk)


def _stream(model, b: _Batch, steps_per_chunk: int) -> Iterator[StreamDelta]:
  stats = GenerationStats()
  texts = [_RowText(model.tokenizer, r.params.stop) for r in b.rows]
  sent = [0] * len(b.rows)
  finished = [False] * len(b.rows)
  state = _run_prefill(model, b, stats)
  for state in _decode_all(model, b, state, texts, stats, min(steps_per_chunk, b.capacity)):
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
