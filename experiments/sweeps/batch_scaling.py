"""Batch-size scaling: greedy decode tok/s and step latency against batch, with the roofline:
reading every weight once per step at the bandwidth measured in the same run bounds tok/s at
batch / (weight bytes / bandwidth); the measured matmul FLOP/s bounds it at FLOP/s / (2 x
parameters). The lower of the two is the ceiling."""

from __future__ import annotations

from experiments import common
from jinfer.benchmark import (BenchConfig, bench_jinfer_point, measured_matmul_flops,
                              measured_read_gbps, param_count, weight_bytes)


def num_points(config) -> int:
  """Checks the config's fields and counts the points the run measures."""
  return len(config.batch_sizes)


def run(config, model, progress) -> tuple[common.Results, common.Figures]:
  """Measures every point (calling progress(1) after each); returns (results, figures)."""
  prompt = common.prompt_ids(model, config.prompt_tokens)
  gbps, gflops = measured_read_gbps(), measured_matmul_flops() / 1e9
  bench = BenchConfig(prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens,
                      repeats=config.repeats, bandwidth_gbps=gbps)
  rows = []
  for batch in config.batch_sizes:
    row = bench_jinfer_point(model, prompt, batch, bench, config.dtype)
    rows.append({"batch": batch, "decode_tok_s": row.decode_tok_s,
                 "ms_per_step": row.ms_per_step, "prefill_ms": row.prefill_ms})
    progress(1)
  nbytes = weight_bytes(model.params)
  num_params = param_count(model.params)
  for row in rows:
    row["bandwidth_ceiling_tok_s"] = row["batch"] * gbps * 1e9 / nbytes
    row["compute_ceiling_tok_s"] = gflops * 1e9 / (2 * num_params)
    row["of_ceiling"] = row["decode_tok_s"] / min(row["bandwidth_ceiling_tok_s"],
                                                  row["compute_ceiling_tok_s"])
  batches = [r["batch"] for r in rows]
  fig, ax = common.figure(f"Decode against batch ({config.model}, {config.dtype})",
                          "batch size", "generated tokens / s")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.plot(batches, [r["decode_tok_s"] for r in rows], marker="o", label="jinfer generate")
  ax.plot(batches, [min(r["bandwidth_ceiling_tok_s"], r["compute_ceiling_tok_s"]) for r in rows],
          color="black", linestyle="--",
          label=f"roofline ({gbps:.1f} GB/s read, {gflops:.0f} GFLOP/s matmul, measured)")
  ax.legend()
  latency, ax2 = common.figure(f"Decode step latency ({config.model})", "batch size",
                               "ms per decode step")
  ax2.set_xscale("log", base=2)
  ax2.plot(batches, [r["ms_per_step"] for r in rows], marker="o")
  results = {"rows": rows, "weight_bytes": nbytes, "parameters": num_params,
             "measured_read_gbps": gbps, "measured_matmul_gflops": gflops}
  return results, {"throughput": fig, "latency": latency}
