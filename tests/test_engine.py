"""The continuous-batching engine on the tiny model: its outputs equal `jinfer.generate`'s
whatever the batch company, arrival time, prefill chunking or preemption; aborts and finished
requests give every page back."""

import dataclasses
import time

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

import jinfer
from jinfer.engine import LLM, Engine
from jinfer.errors import InvalidRequestError

PROMPTS = ["hello world", "a", "the quick brown fox jumps", "xyz" * 10]
GREEDY = [jinfer.SamplingParams(temperature=0, max_tokens=t, ignore_eos=True) for t in (5, 9, 3, 12)]
SEEDED = jinfer.SamplingParams(temperature=1.0, max_tokens=8, seed=3, n=2, ignore_eos=True,
                               logprobs=2)
# Small pages and budget: prompts are prefilled in chunks, and pages are added as rows grow.
SMALL = dict(max_num_seqs=4, max_model_len=64, page_size=4, max_batched_tokens=16)


def _assert_same(got, want):
  assert [c.token_ids for c in got] == [c.token_ids for c in want]
  assert [c.text for c in got] == [c.text for c in want]
  assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
  assert [c.index for c in got] == [c.index for c in want]
  assert [c.prompt_token_ids for c in got] == [c.prompt_token_ids for c in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


@pytest.fixture(scope="module")
def llm(tiny_model):
  return LLM(tiny_model, **SMALL)


def _idle(engine):
  m = engine.metrics()
  assert not engine.has_unfinished()
  assert m["free_pages"] == m["total_pages"] and m["num_running"] == m["num_waiting"] == 0


def test_greedy_equals_generate_with_chunked_prefill(tiny_model, llm):
  _assert_same(llm.generate(PROMPTS, GREEDY), jinfer.generate(tiny_model, PROMPTS, GREEDY))
  _idle(llm.engine)


def test_decode_batch_shrinks_to_row_buckets_with_the_same_outputs(tiny_model):
  # 20 slots: decode runs the live ones gathered into 16 rows, then 8 as requests finish,
  # padded with idle slots; outputs still equal generate's, sampled ones included.
  engine = LLM(tiny_model, **{**SMALL, "max_num_seqs": 20, "max_batched_tokens": 64})
  prompts = [PROMPTS[i % 4] + " " * (i // 4) for i in range(10)]
  params = [dataclasses.replace(GREEDY[i % 4], max_tokens=2 + 2 * i) for i in range(9)] + [SEEDED]
  _assert_same(engine.generate(prompts, params), jinfer.generate(tiny_model, prompts, params))
  _idle(engine.engine)


def test_int8_kv_engine_packs_prefill_through_the_gather_path(tiny_model):
  # int8 pools have no in-place kernel: a pack of 128 one-token rows attends 64 rows at a time.
  model = dataclasses.replace(tiny_model, kv_cache_dtype="int8")
  engine = LLM(model, **{**SMALL, "max_batched_tokens": 128})
  _assert_same(engine.generate(PROMPTS * 2, GREEDY * 2), jinfer.generate(model, PROMPTS * 2, GREEDY * 2))
  _idle(engine.engine)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_pallas_engine_prefills_through_the_ragged_kernel(tiny_model, kv_cache_dtype,
                                                         monkeypatch):
  # attention_impl="pallas": packed prefill chunks go through the ragged paged-attention kernel
  # and decode through the paged one (interpret mode on CPU); same outputs as XLA's.
  import pallas_kernels.ragged_attention as ragged  # pylint: disable=g-import-not-at-top
  traced = []
  kernel = ragged.ragged_paged_attention
  monkeypatch.setattr(ragged, "ragged_paged_attention",
                      lambda *a, **k: traced.append(k["interpret"]) or kernel(*a, **k))
  model = dataclasses.replace(tiny_model, kv_cache_dtype=kv_cache_dtype)
  engine = LLM(dataclasses.replace(model, attention_impl="pallas"), **SMALL)
  _assert_same(engine.generate(PROMPTS, GREEDY), jinfer.generate(model, PROMPTS, GREEDY))
  _idle(engine.engine)
  # Traced once per layer and pack size: compiled on TPU/GPU, interpreted elsewhere.
  assert traced and set(traced) == {jax.default_backend() not in ("tpu", "gpu")}


def test_seeded_samples_logprobs_and_n_equal_generate(tiny_model, llm):
  got = llm.generate(PROMPTS[:2], SEEDED)
  want = jinfer.generate(tiny_model, PROMPTS[:2], SEEDED)
  _assert_same(got, want)
  assert [c.top_logprobs for c in got][0][0].keys() == want[0].top_logprobs[0].keys()
  _idle(llm.engine)


def test_stop_strings_and_stop_tokens_equal_generate(tiny_model, llm):
  free = jinfer.generate(tiny_model, PROMPTS[:1], GREEDY[0])[0]
  text = free.text
  params = [jinfer.SamplingParams(temperature=0, max_tokens=12, stop=[text[2:4]]),
            jinfer.SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free.token_ids[2]])]
  _assert_same(llm.generate(PROMPTS[:1] * 2, params),
               jinfer.generate(tiny_model, PROMPTS[:1] * 2, params))


def test_output_does_not_depend_on_company_or_arrival(tiny_model):
  engine = Engine(tiny_model, **SMALL)
  alone = LLM(tiny_model, **SMALL).generate([PROMPTS[3]], GREEDY[3])[0]
  first = engine.add_request(PROMPTS[0], GREEDY[0])
  texts = {first: []}
  for _ in range(3):
    for out in engine.step():
      texts.setdefault(out.request_id, []).extend(out.token_ids)
  late = engine.add_request(PROMPTS[3], GREEDY[3])  # joins a running batch
  while engine.has_unfinished():
    for out in engine.step():
      texts.setdefault(out.request_id, []).extend(out.token_ids)
  assert texts[late] == alone.token_ids
  _idle(engine)


def test_preemption_does_not_change_outputs(tiny_model):
  # 16 pages of 4 tokens for 4 sequences of up to 42 tokens: the youngest are evicted.
  llm = LLM(tiny_model, **{**SMALL, "num_pages": 16})
  params = [dataclasses.replace(p, max_tokens=12) for p in GREEDY]
  _assert_same(llm.generate(PROMPTS, params), jinfer.generate(tiny_model, PROMPTS, params))
  assert llm.engine.metrics()["num_preemptions"] > 0
  _idle(llm.engine)


def test_abort_frees_pages_at_once_and_ends_the_request(tiny_model):
  engine = Engine(tiny_model, **SMALL)
  keep = engine.add_request(PROMPTS[0], GREEDY[0])
  gone = engine.add_request(PROMPTS[3], dataclasses.replace(GREEDY[3], max_tokens=30))
  outputs = engine.step()
  used = engine.metrics()["total_pages"] - engine.metrics()["free_pages"]
  engine.abort(gone)
  assert engine.metrics()["total_pages"] - engine.metrics()["free_pages"] < used
  while engine.has_unfinished():
    outputs += engine.step()
  reasons = {out.request_id: out.finish_reason for out in outputs if out.finish_reason}
  assert reasons == {keep: "length", gone: "abort"}
  _idle(engine)


def test_a_full_pool_delays_admission(tiny_model):
  # One sequence's worth of pages: requests run one after another, none fails.
  llm = LLM(tiny_model, **{**SMALL, "num_pages": 16})
  got = llm.generate(PROMPTS, GREEDY)
  _assert_same(got, jinfer.generate(tiny_model, PROMPTS, GREEDY))


@pytest.mark.parametrize("prompt, params, words", [
    ("", None, ["prompt 0"]),
    ([], None, ["prompt 0", "empty"]),
    ([1.5], None, ["prompt 0"]),
    ([[1, 2]], None, ["prompt 0"]),
    ("x" * 70, None, ["max_model_len of 64"]),
    ("x", jinfer.SamplingParams(max_tokens=64), ["max_model_len of 64"]),
    ("x", {"max_tokens": 3}, ["SamplingParams"]),
    ("x", jinfer.SamplingParams(logit_bias={300: 1}), ["logit_bias"]),
])
def test_bad_requests_are_refused_and_change_nothing(tiny_model, prompt, params, words):
  engine = Engine(tiny_model, **SMALL)
  engine.add_request("ok", GREEDY[0])
  with pytest.raises(InvalidRequestError) as info:
    engine.add_request(prompt, params)
  for word in words:
    assert word in str(info.value)
  assert engine.metrics()["num_waiting"] == 1


def test_engine_settings_are_checked(tiny_model):
  with pytest.raises(InvalidRequestError, match="num_pages"):
    Engine(tiny_model, **{**SMALL, "num_pages": 3})
  with pytest.raises(InvalidRequestError, match="max_batched_tokens"):
    Engine(tiny_model, **{**SMALL, "max_batched_tokens": 4})
  with pytest.raises(InvalidRequestError, match="mesh"):
    LLM(tiny_model, mesh="2x4")


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 10), st.integers(1, 3),
                                     st.booleans(), st.integers(0, 4)), min_size=1, max_size=6))
def test_random_arrivals_and_aborts_leak_nothing(tiny_model, requests):
  """Each request: (prompt, max_tokens, n, abort it?, step at which it arrives)."""
  engine = Engine(tiny_model, **{**SMALL, "num_pages": 20})
  pending = sorted(enumerate(requests), key=lambda r: r[1][4])
  ids, aborted, finished, step = {}, set(), {}, 0
  while pending or engine.has_unfinished():
    while pending and pending[0][1][4] <= step:
      i, (prompt, max_tokens, n, abort, _) = pending.pop(0)
      params = jinfer.SamplingParams(temperature=0.5, seed=i, max_tokens=max_tokens, n=n)
      ids[engine.add_request(PROMPTS[prompt], params)] = (n, abort)
    for rid, (n, abort) in ids.items():
      if abort and rid not in aborted and step % 2:
        engine.abort(rid)
        aborted.add(rid)
    slots = list(engine.slots().values())
    assert len(slots) == len(set(slots))  # no slot holds two live sequences
    for out in engine.step():
      if out.finish_reason:
        finished.setdefault(out.request_id, set()).add(out.index)
    step += 1
  for rid, (n, abort) in ids.items():
    assert rid in aborted or finished[rid] == set(range(n))
  _idle(engine)


def test_prefix_cache_hits_do_not_change_outputs(tiny_model):
  cold = LLM(tiny_model, **SMALL, enable_prefix_caching=False)
  warm = LLM(tiny_model, **SMALL)
  want = cold.generate(PROMPTS, GREEDY)
  assert cold.engine.metrics()["prefix_cache_hit_rate"] == 0
  _assert_same(warm.generate(PROMPTS, GREEDY), want)  # fills the cache
  _assert_same(warm.generate(PROMPTS, GREEDY), want)  # hits it
  assert warm.engine.metrics()["prefix_cache_hit_rate"] > 0.3
  _idle(warm.engine)


def test_n_samples_share_the_prompt_pages(tiny_model):
  llm = LLM(tiny_model, **SMALL)
  params = dataclasses.replace(SEEDED, n=4, max_tokens=3, logprobs=None)
  _assert_same(llm.generate([PROMPTS[3]], params),
               jinfer.generate(tiny_model, [PROMPTS[3]], params))
  # 30 prompt tokens, 7 full pages of 4: samples 2-4 find them (the last token is computed).
  assert llm.engine.metrics()["prefix_cache_hit_rate"] == pytest.approx(3 * 28 / (4 * 30))


def test_nothing_compiles_after_warmup(tiny_model):
  """Counted with JAX's own compile events, so small host-side ops count too."""
  import jax  # pylint: disable=g-import-not-at-top
  engine = Engine(tiny_model, **SMALL)
  seconds = engine.warmup()
  assert seconds > 0 and engine.metrics()["num_compilations"] > 0
  compiled = engine.metrics()["num_compilations"]
  events = []
  listener = lambda event, duration, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mixed = [jinfer.SamplingParams(temperature=0, max_tokens=5),
             jinfer.SamplingParams(temperature=0.7, seed=2**50, n=3, max_tokens=7, logprobs=3,
                                   logprobs_mode="processed"),
             jinfer.SamplingParams(max_tokens=9, stop=["a"], repetition_penalty=1.3,
                                   bad_words=["xy"], logit_bias={5: 3.0}, min_tokens=2),
             jinfer.SamplingParams(max_tokens=20, top_k=5, top_p=0.9, seed=1)]
    for prompt, params in zip(["hi", "a" * 33, "b" * 50, "c" * 7], mixed):
      engine.add_request(prompt, params)
    while engine.has_unfinished():
      engine.step()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert [e for e in events if "compile" in e] == []
  assert engine.metrics()["num_compilations"] == compiled


def test_async_streams_run_together_and_a_closed_stream_aborts(tiny_model):
  import asyncio  # pylint: disable=g-import-not-at-top
  engine = Engine(tiny_model, **SMALL)
  want = jinfer.generate(tiny_model, PROMPTS[:2], GREEDY[:2])

  async def collect(prompt, params):
    tokens, reason = [], None
    async for out in engine.stream(prompt, params):
      tokens += out.token_ids
      reason = out.finish_reason or reason
    return tokens, reason

  async def cancelled():
    stream = engine.stream(PROMPTS[3], dataclasses.replace(GREEDY[3], max_tokens=30))
    async for _ in stream:
      break  # the client goes away after its first output
    await stream.aclose()

  async def main():
    return await asyncio.gather(collect(PROMPTS[0], GREEDY[0]), collect(PROMPTS[1], GREEDY[1]),
                                cancelled())

  results = asyncio.run(main())
  assert [r[0] for r in results[:2]] == [c.token_ids for c in want]
  assert [r[1] for r in results[:2]] == ["length", "length"]
  deadline = time.monotonic() + 30  # the background thread still reports the abort
  while engine.has_unfinished() and time.monotonic() < deadline:
    time.sleep(0.01)
  _idle(engine)


@pytest.mark.slow
def test_serving_benchmark_on_the_tiny_model(tiny_model):
  from jinfer.engine import benchmark as serving  # pylint: disable=g-import-not-at-top
  cfg = serving.ServingConfig(num_requests=6, min_prompt=4, max_prompt=40, min_output=2,
                              max_output=20, max_num_seqs=4, static_batch=2, parity_batch=2,
                              request_rate=50.0)
  results = serving.run_serving(tiny_model, cfg, ["transformers"], None, log=lambda _: None)
  engine, static = results["rows"]
  assert engine["tokens"] == static["tokens"] == sum(
      n for _, n in serving.workload(tiny_model.tokenizer, cfg))
  assert engine["num_compilations_after_warmup"] == 0
  assert 0 < engine["ttft_p50_ms"] <= engine["ttft_p99_ms"]
  assert "transformers" in results["skipped"]  # no checkpoint path for an in-memory model
  assert results["parity"]["engine_ms_per_step"] > 0
  assert "| jinfer engine |" in serving.format_serving(results)
  assert len(set(serving.arrival_times(cfg))) == cfg.num_requests  # Poisson: distinct times


@pytest.mark.slow
def test_smollm2_engine_equals_generate_through_chunks_preemption_and_prefix_hits(smollm2):
  """The real model: greedy and seeded requests, a chunked 300-token prompt, a pool small enough
  to preempt, and a second pass that hits the prefix cache."""
  from jinfer.evaluate import default_text  # pylint: disable=g-import-not-at-top
  ids = smollm2.tokenizer.encode(default_text())
  prompts = [ids[:300], ids[500:540], ids[40:60], ids[1000:1100]]
  params = [jinfer.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            jinfer.SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True, n=2),
            jinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
            jinfer.SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=30,
                                  ignore_eos=True)]
  want = jinfer.generate(smollm2, prompts, params)
  llm = LLM(smollm2, max_num_seqs=4, max_model_len=336, max_batched_tokens=128,
            num_pages=24, steps_per_call=4)  # 24 pages of 16 tokens: preemption
  for _ in range(2):
    got = llm.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
  metrics = llm.engine.metrics()
  assert metrics["num_preemptions"] > 0 and metrics["prefix_cache_hit_rate"] > 0
  _idle(llm.engine)
