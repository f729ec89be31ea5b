"""`Engine`: continuous batching over one long-lived paged KV pool.

Requests are added and aborted at any time; each `step()` runs what the scheduler planned
(prefill chunks packed in one call, then `steps_per_call` decode steps of the running slots in
one on-device loop) and returns what each sequence produced since the last step. A request's
tokens do not depend on what else is running (per-slot settings, seeds and progress), on when it
arrived, on preemption or on how its prompt was chunked.

    engine = jinfer.Engine(model, max_num_seqs=16)
    rid = engine.add_request("Once upon a time", jinfer.SamplingParams(max_tokens=32))
    while engine.has_unfinished():
      for out in engine.step():
        print(out.request_id, out.text, out.finish_reason)
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import AsyncIterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jinfer import distributed, sharding, validation
from jinfer.buckets import bucket
from jinfer.cache.page_allocator import NO_PAGE, pages_for
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.decoding import loop
from jinfer.decoding.programs import CompileCache
from jinfer.decoding.requests import SequenceRow, bad_word_ids, encode_prompts, stop_ids
from jinfer.decoding.results import GenerationStats
from jinfer.decoding.sampling import MAX_LOGPROBS, SamplingArrays, SamplingParams
from jinfer.decoding.text import SequenceText, finish_reason
from jinfer.engine import programs
from jinfer.engine.scheduler import Scheduler, Sequence, Status
from jinfer.validation import Prompt, check_request

# Bad words an engine request may carry (each counted with and without a leading space), and
# tokens per bad word: fixed so that the slot arrays keep one shape.
MAX_BAD_WORD_VARIANTS = 16
MAX_BAD_WORD_TOKENS = 8


@dataclasses.dataclass
class RequestOutput:
  """What one sequence of a request produced in a step: `token_ids` and `text` are new since
  its last output; `finish_reason` ('stop', 'length' or 'abort') is set on its last one.
  `index` tells apart the n samples of a request; `prompt_token_ids` is the prompt as the engine
  encoded it."""

  request_id: str
  index: int
  token_ids: list[int]
  text: str
  logprobs: list[float]
  top_logprobs: Optional[list[dict[int, float]]] = None
  finish_reason: Optional[str] = None
  stop_reason: Union[int, str, None] = None
  prompt_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class _Sample:
  """One sequence of a request: its scheduling record, text and per-slot settings."""

  request_id: str
  row: SequenceRow  # prompt index unused; `index` is the sample's
  seq: Sequence
  text: SequenceText
  sampling_row: SamplingArrays  # one row
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
  sent: int = 0  # tokens already returned in a RequestOutput
  prompt_token_ids: tuple[int, ...] = ()  # for outputs: read-only, the scheduler keeps a list


class Engine:
  """Continuous batching of one model (see the module docstring).

  `max_num_seqs` slots decode together. The KV pool holds `num_pages` pages of `page_size`
  tokens (default: enough for every slot at half of `max_model_len`, within
  `kv_cache_bytes`); a sequence gets pages as it grows. `max_batched_tokens` bounds the tokens
  of one step (decode tokens first, prefill chunks fill the rest); `steps_per_call` decode
  steps run per host round trip. With `enable_prefix_caching`, full prompt pages outlive
  their request and later requests with the same prefix reuse them. Programs compile per shape
  bucket (prefill pack length, decode rows, page-table width); `warmup()` compiles them all up
  front, and `compilation_cache_dir` keeps them on disk across restarts (JAX's persistent
  cache).
  """

  def __init__(self, model, *, max_num_seqs: int = 64, page_size: int = 16,
               num_pages: Optional[int] = None, max_model_len: Optional[int] = None,
               max_batched_tokens: int = 2048, steps_per_call: int = 4,
               max_logprobs: int = MAX_LOGPROBS, kv_cache_bytes: int = 2 << 30,
               enable_prefix_caching: bool = True,
               compilation_cache_dir: Optional[str] = None):
    validation.model(model)
    check_request(sharding.data_size(model.mesh) == 1,
                  f"an Engine shards over a mesh's model axis only (tensor parallelism); this "
                  f"model's mesh has a data axis of {sharding.data_size(model.mesh)}. Serve it "
                  f"with jinfer.LLM or jinfer.engine.DataParallelEngine (one engine per data "
                  f"row), or shard it with mesh={{'data': 1, 'model': -1}}.")
    if compilation_cache_dir is not None:  # JAX's persistent cache: a restart compiles nothing
      jax.config.update("jax_compilation_cache_dir", validation.text(
          "compilation_cache_dir", compilation_cache_dir))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    self.model = model
    config = model.config
    self.max_num_seqs = validation.integer("max_num_seqs", max_num_seqs, low=1, high=4096)
    self.page_size = validation.integer("page_size", page_size, low=1)
    self.max_model_len = validation.integer(
        "max_model_len", config.max_seq_len if max_model_len is None else max_model_len,
        low=2, high=config.max_seq_len, hint=" (the model's context)")
    self.steps_per_call = validation.integer("steps_per_call", steps_per_call, low=1, high=256)
    self.max_batched_tokens = validation.integer(
        "max_batched_tokens", max_batched_tokens, low=self.max_num_seqs + 1,
        hint=" (more than max_num_seqs, so that prefill always gets tokens)")
    self.max_logprobs = validation.integer("max_logprobs", max_logprobs, low=0, high=MAX_LOGPROBS)
    self.max_pages_per_seq = pages_for(self.max_model_len, self.page_size)
    page_bytes = _page_bytes(config, self.page_size, model.cache_dtype)
    if num_pages is None:
      wanted = self.max_num_seqs * max(self.max_pages_per_seq // 2, 1)
      num_pages = max(min(wanted, kv_cache_bytes // page_bytes), self.max_pages_per_seq)
    self.num_pages = validation.integer(
        "num_pages", num_pages, low=self.max_pages_per_seq,
        hint=f" (at least one sequence of max_model_len={self.max_model_len} must fit)")
    self._scheduler = Scheduler(num_slots=self.max_num_seqs, num_pages=self.num_pages,
                                page_size=self.page_size,
                                max_batched_tokens=self.max_batched_tokens,
                                lookahead=self.steps_per_call,
                                enable_prefix_caching=validation.boolean(
                                    "enable_prefix_caching", enable_prefix_caching))
    self._state = self._empty_state()
    self._programs = CompileCache()  # one executable per program and shape bucket
    self._compile_stats = GenerationStats()
    self._pushed_tables = None
    self._requests: dict[str, list[_Sample]] = {}
    self._by_seq: dict[int, _Sample] = {}
    self._ids = itertools.count()
    self._seq_ids = itertools.count()
    self._lock = threading.Lock()  # add_request/abort may come from another thread
    self._aborted: list[_Sample] = []  # ended by abort, their last output not returned yet
    # stream(): per-request output queues, fed by a background thread that steps the engine.
    self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
    self._stepper: Optional[threading.Thread] = None
    self._stepper_lock = threading.Lock()
    self.generated_tokens = 0
    self._decode_seconds = 0.0  # in decode calls, read-back included
    self._decode_steps = 0
    self._prefill_seconds = 0.0  # in prefill-chunk, insert and restore calls

  # ----------------------------------------------------------------------------- public API

  def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                  request_id: Optional[str] = None) -> str:
    """Queues a prompt (text or token ids); returns its request id. Checked here: a bad request
    raises InvalidRequestError and nothing else changes."""
    params = SamplingParams() if params is None else params
    check_request(isinstance(params, SamplingParams),
                  f"params must be a SamplingParams, got {type(params).__name__}.")
    (prompt_ids,) = encode_prompts(self.model, [prompt])
    params.check_vocab(self.model.config.vocab_size)
    validation.fits_context(0, len(prompt_ids), params.max_tokens, self.max_model_len,
                            "this engine's max_model_len")
    check_request((params.logprobs or 0) <= self.max_logprobs,
                  f"logprobs={params.logprobs} is more than this engine's max_logprobs="
                  f"{self.max_logprobs}; ask for fewer or raise max_logprobs.")
    words = bad_word_ids(self.model.tokenizer, params.bad_words)
    check_request(len(words) <= MAX_BAD_WORD_VARIANTS and
                  all(len(w) <= MAX_BAD_WORD_TOKENS for w in words),
                  f"bad_words must give at most {MAX_BAD_WORD_VARIANTS // 2} words of at most "
                  f"{MAX_BAD_WORD_TOKENS} tokens each in the engine.")
    with self._lock:
      if request_id is None:
        request_id = f"req-{next(self._ids)}"
      check_request(isinstance(request_id, str) and request_id not in self._requests,
                    f"request_id {request_id!r} must be a new string.")
      seed = params.seed if params.seed is not None else distributed.random_seed()
      stops = stop_ids(self.model, params)
      samples = []
      for index in range(params.n):
        seq = Sequence(seq_id=next(self._seq_ids), prompt_ids=prompt_ids,
                       max_tokens=params.max_tokens)
        sampling_row = self._sampling_row(params, seed, stops, index, words)
        samples.append(_Sample(request_id, SequenceRow(0, index, params, stops), seq,
                               SequenceText(self.model.tokenizer, params.stop), sampling_row,
                               prompt_token_ids=tuple(prompt_ids)))
      self._requests[request_id] = samples
      for sample in samples:
        self._by_seq[sample.seq.seq_id] = sample
        self._scheduler.add(sample.seq)
    return request_id

  def abort(self, request_id: str) -> None:
    """Ends a request at once: its pages and slots are free before the next step, which
    returns its last output with finish_reason 'abort'. Unknown or finished ids are ignored."""
    with self._lock:
      for sample in self._requests.pop(request_id, ()):
        if sample.seq.status is not Status.FINISHED:
          self._scheduler.finish(sample.seq)
          self._aborted.append(sample)
        self._by_seq.pop(sample.seq.seq_id, None)

  async def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                   request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
    """Adds a request and yields its outputs as the engine produces them, for a server.

    A background thread steps the engine while any request is unfinished (do not call
    `step()` yourself meanwhile). Closing the iterator early (a client that went away, a
    cancelled task) aborts the request, which frees its pages at once.
    """
    event_loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    request_id = self.add_request(prompt, params, request_id)
    self._queues[request_id] = (queue, event_loop)
    remaining = (params or SamplingParams()).n
    try:
      self._ensure_stepping()
      while remaining:
        out = await queue.get()
        if isinstance(out, Exception):
          raise out
        remaining -= out.finish_reason is not None
        yield out
    finally:
      self._queues.pop(request_id, None)
      if remaining:
        self.abort(request_id)

  def _ensure_stepping(self) -> None:
    with self._stepper_lock:
      if self._stepper is None or not self._stepper.is_alive():
        self._stepper = threading.Thread(target=self._step_while_unfinished, daemon=True,
                                         name="jinfer-engine")
        self._stepper.start()

  def _step_while_unfinished(self) -> None:
    while True:
      with self._stepper_lock:
        if not self.has_unfinished():
          self._stepper = None
          return
      try:
        outputs = self.step()
      except Exception as e:  # pylint: disable=broad-except  (every stream raises it)
        for queue, event_loop in list(self._queues.values()):
          event_loop.call_soon_threadsafe(queue.put_nowait, e)
        with self._stepper_lock:
          self._stepper = None
        return
      for out in outputs:
        queue, event_loop = self._queues.get(out.request_id, (None, None))
        if queue is not None:
          event_loop.call_soon_threadsafe(queue.put_nowait, out)

  def has_unfinished(self) -> bool:
    """Whether requests remain to run or aborted ones to report."""
    return self._scheduler.has_unfinished() or bool(self._aborted)

  def step(self) -> list[RequestOutput]:
    """Runs one scheduled step; returns an output for every sequence that advanced."""
    with self._lock:
      outputs = [RequestOutput(request_id=s.request_id, index=s.row.index, token_ids=[], text="",
                               logprobs=[], finish_reason="abort",
                               prompt_token_ids=s.prompt_token_ids) for s in self._aborted]
      self._aborted.clear()
      plan = self._scheduler.schedule()
      self._sync()
      advanced = []
      start = time.perf_counter()
      if plan.prefill:
        self._prefill(plan.prefill)
        advanced += [self._by_seq[c.seq.seq_id] for c in plan.prefill if c.completes]
        jax.block_until_ready(self._state.decode.num_generated_B)
        self._prefill_seconds += time.perf_counter() - start
      if any(s.seq.status is Status.FINISHED for s in advanced):
        self._sync()
      running = [self._by_seq[s.seq_id] for s in plan.decode if s.status is Status.RUNNING]
      if running:
        self._decode(running)
        advanced += [s for s in running if s not in advanced]
      outputs += [self._output(s) for s in advanced]
      return outputs

  def slots(self) -> dict[tuple[str, int], int]:
    """The slot each sequence that holds one occupies, keyed by (request_id, index)."""
    with self._lock:
      return {(s.request_id, s.row.index): s.seq.slot for s in self._by_seq.values()
              if s.seq.slot is not None}

  def metrics(self) -> dict:
    """Running/waiting requests, pages, prefix-cache hit rate, tokens, compilations, timings."""
    s = self._scheduler
    return {"num_running": s.num_running, "num_waiting": s.num_waiting,
            "num_preemptions": s.num_preemptions, "free_pages": s.num_free_pages,
            "total_pages": s.pages.num_pages, "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            "generated_tokens": self.generated_tokens,
            "num_compilations": self._programs.num_compiled,
            "decode_seconds": self._decode_seconds, "decode_steps": self._decode_steps,
            "prefill_seconds": self._prefill_seconds,
            "compile_seconds": self._compile_stats.compile_s}

  def warmup(self) -> float:
    """Compiles every program for every shape bucket the engine can use, so that no request
    compiles anything later; returns the seconds it took."""
    start = time.perf_counter()
    with self._lock:
      params, config, state = self.model.params, self.model.config, self._state
      i32 = np.int32(0)
      chunk_starts_S1 = np.zeros((self.max_num_seqs + 1,), np.int32)
      for size in _powers_of_two(16, bucket(self.max_batched_tokens)):
        tokens_T = np.zeros((size,), np.int32)
        self._program(programs.prefill, params, state, tokens_T, tokens_T, tokens_T,
                      chunk_starts_S1, config=config)
      for width in self._table_widths():
        for rows in self._row_buckets():
          self._program(programs.generate, params, state, np.arange(rows, dtype=np.int32),
                        config=config, num_steps=self.steps_per_call, table_width=width)
      vocab = config.vocab_size
      # Builds a request's sampling row as add_request does (its small host ops compile once).
      row = self._sampling_row(SamplingParams(), 2**40, [], 0, [])
      self._sampling_row(SamplingParams(), 0, [], 1, [])
      mask_V = np.zeros((vocab,), bool)
      h_SxD = np.zeros((self.max_num_seqs, config.d_model), self.model.params["final_norm"].dtype)
      self._program(programs.insert, params, state, i32, h_SxD, i32, i32, mask_V, row,
                    config=config)
      self._program(programs.restore, state, i32, i32, mask_V,
                    np.zeros((self.max_model_len,), np.int32), i32, np.zeros((vocab,), np.int32),
                    row)
      self._program(programs.sync, state, np.zeros(state.cache.page_tables.shape, np.int32),
                    np.zeros((self.max_num_seqs,), bool))
    return time.perf_counter() - start

  # ----------------------------------------------------------------------------- device work

  def _program(self, jitted, *args, **static):
    """The executable of `jitted` for these arguments' shapes, compiled on first use."""
    return self._programs.get(jitted, args, static, self._compile_stats, self.model.mesh)

  def _table_widths(self) -> list[int]:
    """Page-table widths decode attends over: powers of two, and the whole table; only the
    whole table when attention reads pages in place (its cost then follows positions)."""
    if self._state.cache.decode_reads_pages_in_place:
      return [self.max_pages_per_seq]
    widths = _powers_of_two(1, bucket(self.max_pages_per_seq, minimum=1))
    return sorted({min(w, self.max_pages_per_seq) for w in widths})

  def _row_buckets(self) -> list[int]:
    """Decode batch sizes: powers of two from 8 (below that a step costs about the same: it
    reads the weights once either way), and every slot."""
    rows = _powers_of_two(8, bucket(self.max_num_seqs, minimum=8))
    return sorted({min(r, self.max_num_seqs) for r in rows})

  def _sampling_row(self, params, seed, stops, index, words) -> SamplingArrays:
    return SamplingArrays.from_params(
        [params], [seed], [stops], self.model.config.vocab_size, sample_index=[index],
        bad_word_ids=[words], bad_word_shape=(MAX_BAD_WORD_VARIANTS, MAX_BAD_WORD_TOKENS - 1))

  def _empty_state(self) -> programs.EngineState:
    config, b = self.model.config, self.max_num_seqs
    cache = PagedKVCache.init(config, self.num_pages, self.page_size, b, self.max_pages_per_seq,
                              jnp.dtype(self.model.cache_dtype),
                              attention_impl=self.model.attention_impl)
    decode = loop.empty_state(cache, b, config.vocab_size, self.max_model_len, self.max_logprobs)
    idle = SamplingParams(max_tokens=1, temperature=0.0)
    sampling = SamplingArrays.from_params(
        [idle] * b, [0] * b, [[]] * b, config.vocab_size,
        bad_word_shape=(MAX_BAD_WORD_VARIANTS, MAX_BAD_WORD_TOKENS - 1))
    # Distinct buffers (init shares one zeros array between K and V), so programs can donate
    # and update the state in place.
    state = jax.tree.map(jnp.copy, programs.EngineState(decode=decode, sampling=sampling))
    if self.model.mesh is None:
      return state
    place = lambda spec: jax.sharding.NamedSharding(self.model.mesh, spec)
    return jax.device_put(state, jax.tree.map(place, sharding.state_specs(state)))

  def _sync(self) -> None:
    """Pushes the page tables, and stops every slot that is not decoding."""
    tables_BxM = np.full((self.max_num_seqs, self.max_pages_per_seq), NO_PAGE, np.int32)
    stop_B = np.ones((self.max_num_seqs,), bool)
    for sample in self._by_seq.values():
      seq = sample.seq
      if seq.slot is not None:
        tables_BxM[seq.slot, :len(seq.pages)] = seq.pages
        stop_B[seq.slot] = seq.status is not Status.RUNNING
    key = (tables_BxM.tobytes(), stop_B.tobytes())
    if key != self._pushed_tables:
      self._state = self._program(programs.sync, self._state, tables_BxM, stop_B)(
          self._state, tables_BxM, stop_B)
      self._pushed_tables = key

  def _prefill(self, chunks) -> None:
    """Runs the step's prefill chunks in one packed call, then starts the slots whose prefill
    is done."""
    size = bucket(sum(c.length for c in chunks))
    tokens_T = np.zeros((size,), np.int32)
    slots_T = np.full((size,), self.max_num_seqs, np.int32)  # padding: past the last slot
    positions_T = np.zeros((size,), np.int32)
    chunk_starts_S1 = np.zeros((self.max_num_seqs + 1,), np.int32)  # unused chunks: empty
    assert len(chunks) <= self.max_num_seqs, "a step prefills at most one chunk per slot"
    offset = 0
    for i, chunk in enumerate(chunks):
      seq, packed = chunk.seq, slice(offset, offset + chunk.length)
      tokens_T[packed] = seq.prefill_target[chunk.start:chunk.start + chunk.length]
      slots_T[packed] = seq.slot
      positions_T[packed] = np.arange(chunk.start, chunk.start + chunk.length)
      offset += chunk.length
      chunk_starts_S1[i + 1:] = offset
    params, config = self.model.params, self.model.config
    args = (params, self._state, tokens_T, slots_T, positions_T, chunk_starts_S1)
    h_SxD, self._state = self._program(programs.prefill, *args, config=config)(*args)
    for i, chunk in enumerate(chunks):
      if chunk.completes:
        self._start(self._by_seq[chunk.seq.seq_id], h_SxD, i)

  def _start(self, sample: _Sample, h_SxD, index: int) -> None:
    """Starts a sequence's slot after its prefill: samples its first token from the hidden
    state `h_SxD[index]`, or goes on with the tokens it had when it was preempted."""
    seq = sample.seq
    vocab = self.model.config.vocab_size
    prompt_mask_V = np.zeros((vocab,), bool)
    prompt_mask_V[seq.prompt_ids] = True
    prompt_len = np.int32(len(seq.prompt_ids))
    if seq.generated:  # resumed after a preemption: the same continuation, nothing re-sampled
      tokens_L = np.full((self.max_model_len,), loop.PAD_TOKEN, np.int32)
      tokens_L[:len(seq.generated)] = seq.generated
      counts_V = np.bincount(seq.generated, minlength=vocab).astype(np.int32)
      args = (self._state, np.int32(seq.slot), prompt_len, prompt_mask_V, tokens_L,
              np.int32(len(seq.generated)), counts_V, sample.sampling_row)
      self._state = self._program(programs.restore, *args)(*args)
      return
    args = (self.model.params, self._state, np.int32(seq.slot), h_SxD, np.int32(index),
            prompt_len, prompt_mask_V, sample.sampling_row)
    self._state, token, logprob, top_ids, top_values = self._program(
        programs.insert, *args, config=self.model.config)(*args)
    self._record(sample, [int(token)], [float(logprob)], np.asarray(top_ids)[None],
                 np.asarray(top_values)[None])

  def _decode(self, running: list[_Sample]) -> None:
    self._sync()
    widths = self._table_widths()
    widest = max(len(s.seq.pages) for s in running)
    width = next(w for w in widths if w >= min(bucket(widest, minimum=1), widths[-1]))
    # The running slots, padded to a row bucket with slots that are not decoding.
    live = sorted(s.seq.slot for s in running)
    size = next(r for r in self._row_buckets() if r >= len(live))
    idle = sorted(set(range(self.max_num_seqs)) - set(live))[:size - len(live)]
    rows_R = np.asarray(live + idle, np.int32)
    row_of = {slot: i for i, slot in enumerate(live)}
    before = {id(s): len(s.seq.generated) for s in running}
    args = (self.model.params, self._state, rows_R)
    program = self._program(programs.generate, *args, config=self.model.config,
                            num_steps=self.steps_per_call, table_width=width)
    start = time.perf_counter()
    self._state, tokens_RxK, logprobs_RxK, top_ids, top_values = program(*args)
    num_generated_R = np.asarray(self._state.decode.num_generated_B)[rows_R]
    self._decode_seconds += time.perf_counter() - start
    self._decode_steps += max(int(num_generated_R[row_of[s.seq.slot]]) - before[id(s)]
                              for s in running)
    tokens_RxK, logprobs_RxK = np.asarray(tokens_RxK), np.asarray(logprobs_RxK)
    top_ids, top_values = np.asarray(top_ids), np.asarray(top_values)
    for sample in running:
      row = row_of[sample.seq.slot]
      new = int(num_generated_R[row]) - before[id(sample)]
      self._scheduler.advance(sample.seq, new)
      self._record(sample, tokens_RxK[row, :new].tolist(), logprobs_RxK[row, :new].tolist(),
                   top_ids[row, :new], top_values[row, :new])

  def _record(self, sample: _Sample, tokens, logprobs, top_ids, top_values) -> None:
    """Appends new tokens to a sequence (up to a stop string) and finishes it when done."""
    seq, n = sample.seq, sample.row.params.logprobs
    for i, token in enumerate(tokens):
      sample.text.push([token])
      if sample.text.num_tokens == len(seq.generated):
        break  # a stop string ended the text: later tokens are dropped
      seq.generated.append(token)
      sample.logprobs.append(logprobs[i])
      if n is not None:
        sample.top_logprobs.append(dict(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist())))
      self.generated_tokens += 1
    ids = seq.generated
    if (sample.text.stop is not None or len(ids) >= seq.max_tokens
        or (ids and ids[-1] in sample.row.stop_ids)):
      self._scheduler.finish(seq)

  # ----------------------------------------------------------------------------- outputs

  def _output(self, sample: _Sample) -> RequestOutput:
    seq = sample.seq
    done = seq.status is Status.FINISHED
    new = slice(sample.sent, len(seq.generated))
    sample.sent = len(seq.generated)
    reason = stop_reason = None
    if done:
      reason, stop_reason = finish_reason(sample.row, seq.generated, sample.text)
      self._forget(sample)
    return RequestOutput(
        request_id=sample.request_id, index=sample.row.index, token_ids=seq.generated[new],
        text=sample.text.take(final=done), logprobs=sample.logprobs[new],
        top_logprobs=(sample.top_logprobs[new] if sample.row.params.logprobs is not None
                      else None), finish_reason=reason, stop_reason=stop_reason,
        prompt_token_ids=sample.prompt_token_ids)

  def _forget(self, sample: _Sample) -> None:
    self._by_seq.pop(sample.seq.seq_id, None)
    samples = self._requests.get(sample.request_id, [])
    if all(s.seq.status is Status.FINISHED for s in samples):
      self._requests.pop(sample.request_id, None)


def _powers_of_two(low: int, high: int) -> list[int]:
  return [1 << i for i in range(low.bit_length() - 1, high.bit_length())]


def _page_bytes(config, page_size: int, cache_dtype) -> int:
  """KV bytes of one page in every layer (K and V; int8 pages carry float32 scales)."""
  per_token = 2 * config.n_layers * config.n_kv_heads
  if jnp.dtype(cache_dtype) == jnp.int8:
    return per_token * page_size * (config.head_dim + 4)
  return per_token * page_size * config.head_dim * jnp.dtype(cache_dtype).itemsize
