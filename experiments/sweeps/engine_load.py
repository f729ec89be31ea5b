"""The engine under load: the continuous-batching engine on a random workload at several
Poisson arrival rates (inf: every request at once): throughput and the TTFT / TPOT percentiles
against the offered load."""

from __future__ import annotations

import math

from experiments import common
from jinfer.engine.benchmark import ServingConfig, bench_engine, workload


def num_points(config) -> int:
  """Checks the config's fields and counts the points the run measures."""
  return len(config.request_rates)


def run(config, model, progress) -> tuple[common.Results, common.Figures]:
  """Measures every point (calling progress(1) after each); returns (results, figures)."""
  rows = []
  for rate in config.request_rates:
    serving = ServingConfig(num_requests=config.num_requests, min_prompt=config.min_prompt,
                            max_prompt=config.max_prompt, min_output=config.min_output,
                            max_output=config.max_output, seed=config.seed,
                            request_rate=float(rate), max_num_seqs=config.max_num_seqs,
                            max_batched_tokens=config.max_batched_tokens)
    result = bench_engine(model, workload(model.tokenizer, serving), serving, log=lambda _: None)
    rows.append({"request_rate": float(rate), **result})
    progress(1)
  # inf plotted at twice the largest finite rate, labelled.
  finite = [r["request_rate"] for r in rows if not math.isinf(r["request_rate"])]
  x_inf = 2 * max(finite) if finite else 1.0
  xs = [x_inf if math.isinf(r["request_rate"]) else r["request_rate"] for r in rows]
  title = f"Engine under load ({config.model}, {config.num_requests} requests)"
  latency, ax = common.figure(title, "offered load (requests / s; rightmost: all at once)",
                              "ms")
  for key, label in (("ttft_p50_ms", "TTFT P50"), ("ttft_p99_ms", "TTFT P99"),
                     ("tpot_p50_ms", "TPOT P50"), ("tpot_p99_ms", "TPOT P99")):
    ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
  ax.set_yscale("log")
  ax.legend()
  throughput, ax = common.figure(title, "offered load (requests / s; rightmost: all at once)",
                                 "generated tokens / s")
  ax.plot(xs, [r["tok_s"] for r in rows], marker="o")
  return {"rows": rows}, {"latency": latency, "throughput": throughput}
