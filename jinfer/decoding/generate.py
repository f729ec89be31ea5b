"""`generate` and `generate_stream`: batch prompts of any lengths through one compiled loop.

A prompt asking for n samples is prefilled once; its n rows share that prefill's KV cache.
`model.attention_impl` picks the cache: "xla" (the default) a contiguous `KVCache`; "pallas" a
`PagedKVCache` of `model.page_size`-token pages whose decode steps run the Pallas paged-attention
kernel (prefill gathers pages and uses the XLA math), the n rows of a prompt sharing its pages
(`jinfer.cache.page_plan`). `model.cache_dtype` sets the cache dtype (int8: quantized with
scales). Beam search and speculative decoding keep the contiguous cache.

The pieces: requests.py lays a request out as padded arrays, programs.py holds the compiled
prefill and decode programs, text.py turns tokens into text with stop strings, results.py the
returned types.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Union

import jax.numpy as jnp
import numpy as np

from jinfer import validation
from jinfer.decoding import loop, programs
from jinfer.decoding.requests import PreparedBatch, prepare_batch
from jinfer.decoding.results import Completion, GenerationStats, StreamDelta
from jinfer.decoding.sampling import SamplingParams
from jinfer.decoding.text import SequenceText, finish_reason
from jinfer.validation import Prompt


def run_prefill(model, b: PreparedBatch, stats: GenerationStats) -> loop.DecodeState:
  """Prefills batch `b` (contiguous or paged cache) and returns the decode state; adds its
  time and prompt tokens to `stats`."""
  args = (model.params, b.tokens_PxT, b.prompt_lens_P, b.row_prompt_B, b.sampling, b.done_B)
  static = dict(config=model.config, cache_dtype=jnp.dtype(model.cache_dtype),
                capacity=b.capacity, num_top_logprobs=b.num_top_logprobs)
  if b.pages is None:
    jitted, static["cache_len"] = programs.PREFILL, b.tokens_PxT.shape[1] + b.capacity
  else:
    p = b.pages
    jitted = programs.PREFILL_PAGED
    args += (p.prompt_tables_PxM, p.tables_BxM, p.copy_src_C, p.copy_dst_C)
    static.update(num_pages=p.num_pages, page_size=model.page_size)
  state, seconds = programs.COMPILED.run(jitted, args, static, stats, model.mesh)
  stats.prefill_s += seconds
  stats.prompt_tokens += int(b.prompt_lens_P[:len(b.prompt_ids)].sum())
  return state


def _run_decode(model, b: PreparedBatch, state, num_steps: int, stats) -> loop.DecodeState:
  args = (model.params, state, b.sampling, jnp.int32(num_steps))
  generated_before = int(state.num_generated_B[:len(b.rows)].sum())
  state, seconds = programs.COMPILED.run(programs.DECODE, args, dict(config=model.config), stats,
                                         model.mesh)
  stats.decode_s += seconds
  stats.generated_tokens += int(state.num_generated_B[:len(b.rows)].sum()) - generated_before
  return state


def _decode_all(model, b: PreparedBatch, state, texts: list[SequenceText], stats, chunk: int):
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
    state = _run_decode(model, b, state, chunk, stats)


def _completion(model, b: PreparedBatch, state, i: int, text: SequenceText) -> Completion:
  row = b.rows[i]
  count = text.num_tokens
  ids = np.asarray(state.tokens_BxL[i, :count]).tolist()
  top = None
  if row.params.logprobs is not None:
    top_ids, top_values = np.asarray(state.top_ids_BxLxN[i]), np.asarray(state.top_logprobs_BxLxN[i])
    top = [dict(zip(top_ids[t, :row.params.logprobs].tolist(),
                    top_values[t, :row.params.logprobs].tolist())) for t in range(count)]
  body = text.take(final=True)
  reason, stop_reason = finish_reason(row, ids, text)
  return Completion(text=body, token_ids=ids,
                    logprobs=np.asarray(state.logprobs_BxL[i, :count]).tolist(),
                    finish_reason=reason, prompt_token_ids=b.prompt_ids[row.prompt],
                    stop_reason=stop_reason, top_logprobs=top, index=row.index)


def generate_with_stats(model, prompts: Sequence[Prompt],
                        params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                        steps_per_chunk: int = 16, speculative=None, mesh=None,
                        ) -> tuple[list[Completion], GenerationStats]:
  """`generate`, also returning compile, prefill and decode timings (and acceptance stats)."""
  validation.model(model)
  model = model if mesh is None else model.shard(mesh)
  if speculative is not None:
    from jinfer.decoding import speculative as spec  # pylint: disable=g-import-not-at-top
    return spec.generate_with_stats(model, prompts, params, speculative)
  steps_per_chunk = validation.integer("steps_per_chunk", steps_per_chunk, low=1)
  stats = GenerationStats()
  b = prepare_batch(model, prompts, params)
  texts = [SequenceText(model.tokenizer, r.params.stop) for r in b.rows]
  state = run_prefill(model, b, stats)
  # Stop strings are found on the host between chunks; without any, one call runs to the end.
  chunk = min(steps_per_chunk, b.capacity) if any(r.params.stop for r in b.rows) else b.capacity
  for state in _decode_all(model, b, state, texts, stats, chunk):
    pass
  return [_completion(model, b, state, i, text) for i, text in enumerate(texts)], stats


def generate(model, prompts: Sequence[Prompt],
             params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
             speculative=None, mesh=None) -> list[Completion]:
  """Completes each prompt (a string or a list of token ids) with its SamplingParams.

  Returns one Completion per sequence: prompt order, and a prompt's n samples next to each
  other (`Completion.index` numbers them). `speculative=jinfer.SpeculativeConfig(...)` decodes
  speculatively (same output distribution; greedy output equals plain greedy decoding).
  `mesh` (a jax Mesh with axes ("data", "model"), or sizes such as {"model": -1}) shards the
  model over it first (`Model.shard`: tensor parallel over `model`, rows over `data`); a model
  loaded or sharded onto a mesh runs there without it.
  """
  return generate_with_stats(model, prompts, params, speculative=speculative, mesh=mesh)[0]


def generate_stream(model, prompts: Sequence[Prompt],
                    params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                    steps_per_chunk: int = 8, mesh=None) -> Iterator[StreamDelta]:
  """Yields StreamDeltas as tokens are produced, every `steps_per_chunk` decode steps.

  The same compiled loop as `generate` runs `steps_per_chunk` steps per call, so streaming costs
  one host round trip per chunk, not per token. Text never ends in half a UTF-8 character, and
  text that may be the start of a stop string is held back until it is known not to be.
  `StreamDelta.index` is the sequence's position in what `generate` would return. The request
  is checked when this is called, before the first delta is asked for. `mesh`: as in
  `generate`.
  """
  # Checked here, so a bad request raises before iteration.
  steps_per_chunk = validation.integer("steps_per_chunk", steps_per_chunk, low=1)
  validation.model(model)
  model = model if mesh is None else model.shard(mesh)
  b = prepare_batch(model, prompts, params)
  return _stream(model, b, steps_per_chunk)


def _stream(model, b: PreparedBatch, steps_per_chunk: int) -> Iterator[StreamDelta]:
  stats = GenerationStats()
  texts = [SequenceText(model.tokenizer, r.params.stop) for r in b.rows]
  sent = [0] * len(b.rows)
  finished = [False] * len(b.rows)
  state = run_prefill(model, b, stats)
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
        reason, stop_reason = finish_reason(b.rows[i], tokens_BxL[i, :text.num_tokens].tolist(), text)
      if new_ids or piece or reason:
        yield StreamDelta(index=i, text=piece, token_ids=new_ids, finish_reason=reason,
                          stop_reason=stop_reason)
