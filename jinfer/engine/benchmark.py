"""Serving throughput and latency: the engine against static batching, in one run.

  jinfer benchmark --serving --peers=transformers [--request_rate=4]

The workload: `num_requests` requests with prompts of `min_prompt`-`max_prompt` tokens (cut
from the benchmark text) and outputs of `min_output`-`max_output` tokens, drawn from `seed`;
greedy, EOS ignored, so every system generates exactly the same tokens. Measured:

- the engine (`jinfer.LLM`, after `warmup()`): all requests submitted at once, or arriving as a
  Poisson process at `request_rate` per second; total throughput, time to first token (TTFT)
  and time per output token after the first (TPOT) at P50/P95/P99, as the caller sees them;
- `jinfer.generate` in static batches of `static_batch` in submission order (what a user without
  the engine does): each batch runs until its longest request ends; compile time excluded;
- transformers static batching (`--peers=transformers`), the same batches, left-padded;
- the decode step of the engine and of `jinfer.generate` at the same batch size on same-length
  requests (`parity_batch`).

Throughput counts each request's requested output tokens, once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jinfer.benchmark import (PROMPT_TEXT, PeerContext, PeerUnavailable, advance,
                              load_transformers_model)


@dataclasses.dataclass(frozen=True)
class ServingConfig:
  """The serving workload (request count, prompt and output length ranges, arrival rate) and
  the engine and static-batch settings it is served with."""

  num_requests: int = 64
  min_prompt: int = 32
  max_prompt: int = 512
  min_output: int = 16
  max_output: int = 256
  seed: int = 0
  request_rate: float = math.inf  # requests per second (Poisson); inf: all at once
  max_num_seqs: int = 64
  static_batch: int = 8
  steps_per_call: int = 8
  max_batched_tokens: int = 2048
  parity_batch: int = 8


Request = tuple[list[int], int]  # (prompt token ids, output tokens)


def workload(tokenizer, cfg: ServingConfig, text: Optional[str] = None) -> list[Request]:
  """The requests, drawn from `cfg.seed`: prompts are windows of the (repeated) text."""
  from jinfer.evaluate import default_text  # pylint: disable=g-import-not-at-top
  ids = tokenizer.encode(text if text is not None else default_text() + PROMPT_TEXT)
  while len(ids) < 2 * cfg.max_prompt:
    ids = ids + ids
  rng = np.random.default_rng(cfg.seed)
  requests = []
  for _ in range(cfg.num_requests):
    length = int(rng.integers(cfg.min_prompt, cfg.max_prompt + 1))
    start = int(rng.integers(0, len(ids) - length))
    requests.append((ids[start:start + length],
                     int(rng.integers(cfg.min_output, cfg.max_output + 1))))
  return requests


def arrival_times(cfg: ServingConfig) -> np.ndarray:
  """Seconds after the start at which each request arrives (all 0 for an infinite rate)."""
  if math.isinf(cfg.request_rate):
    return np.zeros(cfg.num_requests)
  gaps = np.random.default_rng(cfg.seed + 1).exponential(1 / cfg.request_rate, cfg.num_requests)
  return np.cumsum(gaps) - gaps[0]


def _greedy(max_tokens: int):
  import jinfer  # pylint: disable=g-import-not-at-top
  return jinfer.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _percentiles(name: str, values: Sequence[float]) -> dict[str, float]:
  return {f"{name}_p{p}_ms": float(np.percentile(values, p) * 1e3) for p in (50, 95, 99)}


def bench_engine(model, requests: Sequence[Request], cfg: ServingConfig,
                 log: Callable[[str], None] = print, progress=None) -> dict[str, Any]:
  """The engine on the workload, after warm-up: throughput, TTFT and TPOT percentiles, and the
  per-request TTFTs and TPOTs in seconds (`request_ttft_s`, `request_tpot_s`) for CDFs.
  `progress` moves on by one per completed request."""
  from jinfer.engine import Engine  # pylint: disable=g-import-not-at-top
  max_len = max(len(p) + n for p, n in requests)
  engine = Engine(model, max_num_seqs=cfg.max_num_seqs, max_model_len=max_len,
                  steps_per_call=cfg.steps_per_call, max_batched_tokens=cfg.max_batched_tokens)
  log(f"engine: warm-up ({engine.metrics()['total_pages']} pages) ...")
  warmup_s = engine.warmup()
  compiled = engine.metrics()["num_compilations"]
  arrivals = arrival_times(cfg)
  first, last, submitted = {}, {}, {}
  pending = list(range(len(requests)))
  log(f"engine: {len(requests)} requests ...")
  start = time.perf_counter()
  while pending or engine.has_unfinished():
    now = time.perf_counter() - start
    while pending and arrivals[pending[0]] <= now:
      i = pending.pop(0)
      prompt, n = requests[i]
      submitted[engine.add_request(prompt, _greedy(n), request_id=str(i))] = now
    if not engine.has_unfinished():
      time.sleep(max(0.0, arrivals[pending[0]] - now))
      continue
    for out in engine.step():
      t = time.perf_counter() - start
      if out.token_ids:
        first.setdefault(out.request_id, t)
        last[out.request_id] = t
      if out.finish_reason is not None:
        advance(progress)
  seconds = time.perf_counter() - start
  tokens = sum(n for _, n in requests)
  ttft = [first[r] - submitted[r] for r in submitted]
  tpot = [(last[r] - first[r]) / (requests[int(r)][1] - 1) for r in submitted
          if requests[int(r)][1] > 1]
  metrics = engine.metrics()
  return {"system": "jinfer engine", "seconds": seconds, "tokens": tokens,
          "tok_s": tokens / seconds, "warmup_s": warmup_s,
          "num_preemptions": metrics["num_preemptions"],
          "num_compilations_after_warmup": metrics["num_compilations"] - compiled,
          **_percentiles("ttft", ttft), **_percentiles("tpot", tpot),
          "request_ttft_s": ttft, "request_tpot_s": tpot}


def _static_batches(requests: Sequence[Request], batch: int) -> list[list[Request]]:
  return [list(requests[i:i + batch]) for i in range(0, len(requests), batch)]


def bench_static_generate(model, requests: Sequence[Request], batch: int,
                          log: Callable[[str], None] = print, progress=None) -> dict[str, Any]:
  """`jinfer.generate` over batches of `batch` requests in order; compile time excluded."""
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  log(f"jinfer.generate: static batches of {batch} ...")
  seconds = 0.0
  for group in _static_batches(requests, batch):
    start = time.perf_counter()
    _, stats = generate_with_stats(model, [p for p, _ in group], [_greedy(n) for _, n in group])
    seconds += time.perf_counter() - start - stats.compile_s
    advance(progress, len(group))
  tokens = sum(n for _, n in requests)
  return {"system": f"jinfer.generate, static batches of {batch}", "seconds": seconds,
          "tokens": tokens, "tok_s": tokens / seconds}


def bench_transformers_static(ctx: PeerContext, requests: Sequence[Request], batch: int,
                              log: Callable[[str], None] = print,
                              progress=None) -> dict[str, Any]:
  """transformers `generate` over the same batches, left-padded, each batch to its longest
  output (static batching), after one warm-up batch."""
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = load_transformers_model(ctx)
  torch.set_num_threads(max(1, torch.get_num_threads()))
  log(f"transformers: static batches of {batch} ...")

  def run(group) -> float:
    width = max(len(p) for p, _ in group)
    ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
    new = max(n for _, n in group)
    start = time.perf_counter()
    with torch.inference_mode():
      torch_model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start

  run([(requests[0][0], 4)])  # warm-up
  seconds = 0.0
  for group in _static_batches(requests, batch):
    seconds += run(group)
    advance(progress, len(group))
  tokens = sum(n for _, n in requests)
  return {"system": f"transformers static batches of {batch}", "seconds": seconds,
          "tokens": tokens, "tok_s": tokens / seconds}


def bench_step_parity(model, cfg: ServingConfig, prompt_len: int = 64, new_tokens: int = 129,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
  """Decode ms per step of the engine and of `jinfer.generate`, `parity_batch` same-length
  requests each, best of 2 after a warm-up."""
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  from jinfer.engine import Engine  # pylint: disable=g-import-not-at-top
  batch = cfg.parity_batch
  prompt = workload(model.tokenizer, dataclasses.replace(
      cfg, num_requests=1, min_prompt=prompt_len, max_prompt=prompt_len))[0][0]
  params = _greedy(new_tokens)
  log(f"decode step parity at batch {batch} ...")
  generate_ms = math.inf
  for _ in range(3):
    _, stats = generate_with_stats(model, [prompt] * batch, params)
    generate_ms = min(generate_ms, stats.decode_s / (new_tokens - 1) * 1e3)
  engine = Engine(model, max_num_seqs=batch, max_model_len=prompt_len + new_tokens,
                  steps_per_call=cfg.steps_per_call, enable_prefix_caching=False)
  engine.warmup()
  engine_ms = math.inf
  for _ in range(3):
    for _ in range(batch):
      engine.add_request(prompt, params)
    engine.step()  # prefill (and the first decode call)
    before = engine.metrics()["decode_seconds"], engine.metrics()["decode_steps"]
    while engine.has_unfinished():
      engine.step()
    after = engine.metrics()["decode_seconds"], engine.metrics()["decode_steps"]
    engine_ms = min(engine_ms, (after[0] - before[0]) / (after[1] - before[1]) * 1e3)
  return {"batch": batch, "generate_ms_per_step": generate_ms,
          "engine_ms_per_step": engine_ms, "ratio": engine_ms / generate_ms}


def serving_points(cfg: ServingConfig, peers: Sequence[str]) -> int:
  """Progress bar steps of `run_serving`: each system's completed requests."""
  return cfg.num_requests * (2 + ("transformers" in peers))


def run_serving(model, cfg: ServingConfig, peers: Sequence[str], ctx: Optional[PeerContext],
                log: Callable[[str], None] = print, progress=None) -> dict[str, Any]:
  """The serving comparison (module docstring); `progress` (a tqdm bar) moves on by one per
  request a system completes, `serving_points` in all."""
  requests = workload(model.tokenizer, cfg)
  rows = [bench_engine(model, requests, cfg, log, progress),
          bench_static_generate(model, requests, cfg.static_batch, log, progress)]
  skipped = {}
  if "transformers" in peers:
    done_before = progress.n if progress is not None else 0
    try:
      if ctx is None:
        raise PeerUnavailable("no checkpoint path to give it (the model was passed in memory).")
      rows.append(bench_transformers_static(ctx, requests, cfg.static_batch, log, progress))
    except PeerUnavailable as e:
      skipped["transformers"] = str(e)
      if progress is not None:  # its requests still count, so the bar ends full
        advance(progress, done_before + cfg.num_requests - progress.n)
  return {"config": dataclasses.asdict(cfg), "rows": rows, "skipped": skipped,
          "parity": bench_step_parity(model, cfg, log=log)}


def format_serving(results: dict[str, Any]) -> str:
  """Markdown report of `run_serving`'s results: throughput, latency percentiles, parity."""
  cfg, rows = results["config"], results["rows"]
  rate = cfg["request_rate"]
  lines = [f"serving: {cfg['num_requests']} requests, prompts {cfg['min_prompt']}-"
           f"{cfg['max_prompt']} tokens, outputs {cfg['min_output']}-{cfg['max_output']} "
           f"(seed {cfg['seed']}), " + ("all submitted at once" if math.isinf(rate) else
                                        f"Poisson arrivals at {rate}/s"), "",
           "| system | seconds | tok/s | vs engine |", "|---|---|---|---|"]
  engine = rows[0]
  for row in rows:
    lines.append(f"| {row['system']} | {row['seconds']:.1f} | {row['tok_s']:.1f} | "
                 f"{row['tok_s'] / engine['tok_s']:.2f}x |")
  lines += ["", "engine latency (ms): " + ", ".join(
      f"{k.removesuffix('_ms').upper().replace('_', ' ')} {engine[k]:.0f}"
      for k in engine if k.endswith("_ms")),
            f"engine warm-up {engine['warmup_s']:.1f} s, compilations after it: "
            f"{engine['num_compilations_after_warmup']}, preemptions: "
            f"{engine['num_preemptions']}"]
  lines += [f"{name}: skipped: {why}" for name, why in results["skipped"].items()]
  p = results["parity"]
  lines.append(f"decode step at batch {p['batch']}, same-length requests: engine "
               f"{p['engine_ms_per_step']:.1f} ms, jinfer.generate "
               f"{p['generate_ms_per_step']:.1f} ms ({p['ratio']:.2f}x)")
  return "\n".join(lines)
