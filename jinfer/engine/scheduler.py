"""Which sequences run each engine step: plain, deterministic host-side Python.

- FCFS admission: waiting sequences take free slots in arrival order, and none overtakes an
  older one that cannot start yet.
- A per-step token budget (`max_batched_tokens`): every running sequence's decode token counts
  first; the rest goes to prefill, in chunks, so a long prompt is spread over several steps
  while the running sequences keep decoding (chunked prefill).
- Pages are added as a sequence grows (`PageAllocator`), enough for the next `lookahead`
  decode steps. When the pool runs out, the youngest sequence holding pages is preempted: its
  pages and slot are freed, and it waits again (ahead of younger ones) to be prefilled anew from
  its prompt and the tokens it had generated, so its output does not change.
- A full pool delays admission; it never raises.
- Prefix caching (`jinfer.cache.prefix_cache`): a starting sequence shares the cached pages of
  the longest prefix of its tokens and computes only the rest; the full pages it computes are
  cached in turn (at planning time: chunks run in plan order, so a later chunk of the same step
  may already use them, as the n samples of one prompt do).

The scheduler knows nothing of devices or text: `Engine` runs what it plans, and a test can
drive it with a mock engine.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from jinfer.cache.page_allocator import PageAllocator, pages_for
from jinfer.cache.prefix_cache import PrefixCache
from jinfer.errors import CacheFullError


class Status(enum.Enum):
  """Where a sequence is in its life: waiting, prefilling, running or finished."""

  WAITING = "waiting"  # no slot; nothing in the cache
  PREFILLING = "prefilling"  # has a slot; part of its prefill target is in the cache
  RUNNING = "running"  # decoding
  FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
  """One sequence's scheduling state. `generated` holds its tokens so far (the engine appends)."""

  seq_id: int
  prompt_ids: list[int]
  max_tokens: int
  generated: list[int] = dataclasses.field(default_factory=list)
  status: Status = Status.WAITING
  slot: Optional[int] = None
  pages: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0  # tokens whose KV is in the cache
  num_preemptions: int = 0

  @property
  def prefill_target(self) -> list[int]:
    """The tokens in the cache before decoding (re)starts: the prompt, and after a preemption
    also every generated token but the last (decode feeds the last one)."""
    return self.prompt_ids + self.generated[:-1]

  @property
  def max_cache_len(self) -> int:
    """Tokens ever in the cache: decode never feeds the final token."""
    return len(self.prompt_ids) + self.max_tokens - 1


@dataclasses.dataclass
class PrefillChunk:
  """`length` prompt tokens of `seq`, from position `start`, to prefill in one step."""

  seq: Sequence
  start: int  # first position of the chunk
  length: int

  @property
  def completes(self) -> bool:
    """This chunk finishes the sequence's prefill target."""
    return self.start + self.length == len(self.seq.prefill_target)


@dataclasses.dataclass
class Plan:
  """One step: prefill chunks (in order), then a decode of `decode` (RUNNING sequences, which
  includes those whose prefill completes in this step). `preempted` lost their slot and pages."""

  prefill: list[PrefillChunk]
  decode: list[Sequence]
  preempted: list[Sequence]


class Scheduler:
  """Assigns slots, pages and prefill chunks to sequences, step by step."""

  def __init__(self, *, num_slots: int, num_pages: int, page_size: int,
               max_batched_tokens: int, lookahead: int, enable_prefix_caching: bool = True):
    self.pages = PageAllocator(num_pages)
    self.prefix_cache = PrefixCache(self.pages, page_size) if enable_prefix_caching else None
    self.queried_tokens = 0  # prefill-target tokens of started sequences
    self.cached_tokens = 0  # of those, found in the prefix cache
    self.page_size = page_size
    self.max_batched_tokens = max_batched_tokens
    self.lookahead = lookahead
    self._free_slots = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
    self._live: list[Sequence] = []  # not finished, in arrival order
    self.num_preemptions = 0

  @property
  def num_free_pages(self) -> int:
    """Free pages, counting cached pages that no sequence holds (they are evicted on demand)."""
    return self.pages.num_free + (self.prefix_cache.num_evictable if self.prefix_cache else 0)

  @property
  def prefix_cache_hit_rate(self) -> float:
    """Prompt tokens found in the prefix cache over tokens looked up (0 before any lookup)."""
    return self.cached_tokens / self.queried_tokens if self.queried_tokens else 0.0

  @property
  def num_running(self) -> int:
    """Live sequences that hold a slot (prefilling or decoding)."""
    return sum(s.status is not Status.WAITING for s in self._live)

  @property
  def num_waiting(self) -> int:
    """Live sequences waiting for a slot."""
    return sum(s.status is Status.WAITING for s in self._live)

  def has_unfinished(self) -> bool:
    """Whether any sequence is still live."""
    return bool(self._live)

  def add(self, seq: Sequence) -> None:
    """Queues a sequence (arrival order is the order of `add` calls)."""
    self._live.append(seq)

  def finish(self, seq: Sequence) -> None:
    """Ends a sequence (finished or aborted): its slot and pages are free at once."""
    if seq.status is Status.FINISHED:
      return
    self._release(seq)
    seq.status = Status.FINISHED
    self._live.remove(seq)

  def schedule(self) -> Plan:
    """Plans one step. Sequences are visited oldest first: a running one gets pages for
    `lookahead` more tokens, a prefilling or waiting one a prefill chunk within the budget (and,
    when the chunk completes its prefill, pages for its first decode steps). A sequence that
    holds a slot may preempt younger ones for pages; a waiting one starts only with a free slot
    and free pages, and none starts while an older one waits."""
    running = [s for s in self._live if s.status is Status.RUNNING]
    budget = self.max_batched_tokens - len(running)
    plan = Plan(prefill=[], decode=[], preempted=[])
    admitting = True
    for seq in list(self._live):
      if seq in plan.preempted:
        continue  # not re-admitted in the step that preempted it
      if seq.status is Status.RUNNING:
        if self._grow_or_preempt(seq, seq.num_computed + self.lookahead, plan):
          plan.decode.append(seq)
        continue
      waiting = seq.status is Status.WAITING
      if budget <= 0 or (waiting and not (admitting and self._free_slots)):
        admitting = admitting and not waiting  # FCFS: nobody overtakes a waiting sequence
        continue
      target = seq.prefill_target
      if waiting:
        self._reuse_cached_prefix(seq)
      length = min(budget, len(target) - seq.num_computed)
      end = seq.num_computed + length
      completes = end == len(target)
      need = end + self.lookahead if completes else end
      if waiting:
        if not self._grow(seq, min(need, seq.max_cache_len)):
          self._release(seq)
          seq.num_computed = 0
          admitting = False  # the pool is full: wait for pages to be freed
          continue
        seq.slot, seq.status = self._free_slots.pop(), Status.PREFILLING
        self.queried_tokens += len(target)
        self.cached_tokens += seq.num_computed
      elif not self._grow_or_preempt(seq, need, plan):
        continue
      plan.prefill.append(PrefillChunk(seq, seq.num_computed, length))
      seq.num_computed = end
      budget -= length
      if self.prefix_cache is not None:
        self.prefix_cache.insert(target[:end], seq.pages)
      if completes:
        seq.status = Status.RUNNING
        plan.decode.append(seq)
    return plan

  def _grow_or_preempt(self, seq: Sequence, length: int, plan: Plan) -> bool:
    """Pages for `length` tokens of `seq` (at most its max_cache_len), preempting the youngest
    sequences holding pages until they fit; False if `seq` itself was preempted."""
    length = min(length, seq.max_cache_len)
    while not self._grow(seq, length):
      victim = next(s for s in reversed(self._live) if s.pages)
      self._preempt(victim)
      plan.preempted.append(victim)
      if victim in plan.decode:
        plan.decode.remove(victim)
      if victim is seq:
        return False
    return True

  def advance(self, seq: Sequence, num_fed: int) -> None:
    """Records that decode fed `num_fed` more of the sequence's tokens into the cache."""
    seq.num_computed += num_fed

  def _reuse_cached_prefix(self, seq: Sequence) -> None:
    """Starts `seq` from the cached pages of its longest cached prefix (its last token is always
    computed: its logits give the first sampled token)."""
    if self.prefix_cache is not None:
      target = seq.prefill_target
      seq.pages = self.prefix_cache.lookup(target, len(target) - 1)
      seq.num_computed = len(seq.pages) * self.page_size

  def _grow(self, seq: Sequence, length: int) -> bool:
    missing = pages_for(length, self.page_size) - len(seq.pages)
    if missing <= 0:
      return True
    allocate = self.prefix_cache.allocate if self.prefix_cache else self.pages.allocate
    try:
      seq.pages += allocate(missing)
    except CacheFullError:
      return False
    return True

  def _preempt(self, seq: Sequence) -> None:
    self._release(seq)
    seq.status, seq.num_computed = Status.WAITING, 0
    seq.num_preemptions += 1
    self.num_preemptions += 1

  def _release(self, seq: Sequence) -> None:
    if seq.pages:
      self.pages.free(seq.pages)
      seq.pages = []
    if seq.slot is not None:
      self._free_slots.append(seq.slot)
      seq.slot = None
