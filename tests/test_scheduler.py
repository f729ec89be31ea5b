"""The scheduler and the prefix cache, driven by hand (plain Python, no device): admission
order, token budget, chunked prefill, preemption, abort and page reuse, worked out by hand."""

import pytest

from jinfer.cache.page_allocator import PageAllocator
from jinfer.cache.prefix_cache import PrefixCache
from jinfer.engine.scheduler import Scheduler, Sequence, Status


class MockEngine:
  """Runs a scheduler's plans: prefill is instant, each decode step generates token 7 and
  feeds one token per step, like the real engine's bookkeeping."""

  def __init__(self, scheduler: Scheduler, steps: int = 1):
    self.scheduler, self.steps = scheduler, steps
    self.log = []

  def step(self):
    plan = self.scheduler.schedule()
    self.log.append(plan)
    for chunk in plan.prefill:
      if chunk.completes and not chunk.seq.generated:
        chunk.seq.generated.append(7)  # the first token, sampled after the prefill
        self._maybe_finish(chunk.seq)
    for seq in plan.decode:
      if seq.status is not Status.RUNNING:
        continue
      new = min(self.steps, seq.max_tokens - len(seq.generated))
      seq.generated += [7] * new
      self.scheduler.advance(seq, new)
      self._maybe_finish(seq)
    return plan

  def _maybe_finish(self, seq):
    if len(seq.generated) >= seq.max_tokens:
      self.scheduler.finish(seq)

  def run(self, limit=100):
    for _ in range(limit):
      if not self.scheduler.has_unfinished():
        return
      self.step()
    raise AssertionError("did not finish")


def _seq(i, prompt_len, max_tokens, token=None):
  return Sequence(seq_id=i, prompt_ids=[token if token is not None else i] * prompt_len,
                  max_tokens=max_tokens)


def _scheduler(**kwargs):
  settings = dict(num_slots=2, num_pages=16, page_size=4, max_batched_tokens=8, lookahead=1,
                  enable_prefix_caching=False)
  return Scheduler(**{**settings, **kwargs})


def test_fcfs_admission_under_the_token_budget():
  s = _scheduler()
  a, b, c = _seq(0, 5, 3), _seq(1, 2, 3), _seq(2, 2, 3)
  for seq in (a, b, c):
    s.add(seq)
  plan = s.schedule()
  # Budget 8: a's 5 prompt tokens, b's 2; c waits for a slot (2 slots).
  assert [(ch.seq, ch.start, ch.length) for ch in plan.prefill] == [(a, 0, 5), (b, 0, 2)]
  assert plan.decode == [a, b] and c.status is Status.WAITING
  assert a.slot != b.slot and {a.slot, b.slot} == {0, 1}


def test_long_prompts_are_chunked_between_decode_steps():
  s = _scheduler(max_batched_tokens=4)
  short, long_ = _seq(0, 2, 10), _seq(1, 11, 2)
  engine = MockEngine(s)
  s.add(short)
  s.add(long_)
  plans = [engine.step() for _ in range(4)]
  # Step 1: short's prompt (2) + 2 tokens of long's; then 1 decode token + 3 of long's each step.
  assert [[(c.seq.seq_id, c.start, c.length) for c in p.prefill] for p in plans] == [
      [(0, 0, 2), (1, 0, 2)], [(1, 2, 3)], [(1, 5, 3)], [(1, 8, 3)]]
  assert all(short in p.decode for p in plans)  # decode never waits for the long prefill
  assert long_ in plans[3].decode  # its first decode step is in the step its prefill completes
  assert long_.generated == [7, 7] and long_.status is Status.FINISHED


def test_preemption_evicts_the_youngest_and_recomputes_it():
  # 4 pages of 4 tokens: two sequences of up to 4 + 6 - 1 = 9 tokens (3 pages each) don't fit.
  s = _scheduler(num_pages=4, max_batched_tokens=16)
  old, young = _seq(0, 4, 6), _seq(1, 4, 6)
  engine = MockEngine(s)
  s.add(old)
  s.add(young)
  engine.run()
  preempted = [seq for plan in engine.log for seq in plan.preempted]
  assert preempted and all(seq is young for seq in preempted)
  assert young.num_preemptions == len(preempted) and s.num_preemptions == len(preempted)
  # After a preemption the young one re-prefills its prompt and all but its last token.
  resumed = [c for plan in engine.log for c in plan.prefill if c.seq is young and c.start == 0]
  assert len(resumed) == 1 + len(preempted)
  assert len(old.generated) == len(young.generated) == 6
  assert s.pages.num_free == 4


def test_a_full_pool_delays_admission_without_raising():
  s = _scheduler(num_pages=3, num_slots=4, max_batched_tokens=16)
  seqs = [_seq(i, 4, 5) for i in range(3)]  # each needs 2 pages (8 tokens)
  for seq in seqs:
    s.add(seq)
  plan = s.schedule()
  assert [c.seq for c in plan.prefill] == [seqs[0]]  # the second would need a 4th page
  assert seqs[1].status is seqs[2].status is Status.WAITING and not seqs[1].pages
  MockEngine(s).run()
  assert s.pages.num_free == 3


def test_finish_frees_slot_and_pages_at_once():
  s = _scheduler()
  a = _seq(0, 6, 50)
  s.add(a)
  s.schedule()
  assert s.pages.num_free < 16 and a.slot is not None
  s.finish(a)
  assert s.pages.num_free == 16 and a.status is Status.FINISHED and not s.has_unfinished()


def test_prefix_cache_shares_full_pages_and_counts_hits():
  s = _scheduler(enable_prefix_caching=True, max_batched_tokens=32)
  first, second = _seq(0, 10, 2, token=5), _seq(1, 10, 2, token=5)
  engine = MockEngine(s)
  s.add(first)
  engine.run()
  s.add(second)
  plan = engine.step()
  # 10 tokens = 2 full pages cached; the second computes only tokens 8 and 9.
  assert [(c.start, c.length) for c in plan.prefill] == [(8, 2)]
  assert s.prefix_cache_hit_rate == pytest.approx(8 / 20)
  engine.run()
  assert s.num_free_pages == 16  # cached pages nobody holds count as free


def test_prefix_cache_lru_eviction_and_refcounts():
  allocator = PageAllocator(4)
  cache = PrefixCache(allocator, page_size=2)
  a = allocator.allocate(2)
  cache.insert([1, 2, 3, 4], a)
  allocator.free(a)  # only the cache holds them now
  assert cache.num_evictable == 2 and allocator.num_free == 2
  hit = cache.lookup([1, 2, 3, 4, 9], max_tokens=4)
  assert hit == a and cache.num_evictable == 0
  assert cache.lookup([1, 2, 7, 7], max_tokens=4) == [a[0]]  # a different second page
  allocator.free(hit + [a[0]])
  b = allocator.allocate(1)
  cache.insert([8, 8], b)
  allocator.free(b)
  # 1 page free, 3 evictable: taking 3 evicts the 2 least recently used.
  cache.lookup([8, 8], max_tokens=2)
  allocator.free(b)
  pages = cache.allocate(3)
  assert len(pages) == 3 and cache.num_cached == 1
  assert cache.lookup([8, 8], max_tokens=2) == b  # the most recently used survived
