"""Plots of `jinfer benchmark` results: decode.png (decode tok/s against batch size, with the
roofline) and serving.png (latency CDFs); prefill.png is jinfer/prefill_benchmark.py's.

They take the plain JSON-able results the benchmark functions return (or a --json_out file
read back), so they are tested, and can be redrawn, without a model. Figures are bare
`matplotlib.figure.Figure`s: `savefig` renders them with Agg, so there is no display, no pyplot
state and no backend switch in the caller's process.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from jinfer.benchmark import roofline_tok_s

DPI = 100
DECODE_SIZE_IN = (8, 5)  # (width, height) inches: 800 x 500 pixels at DPI
SERVING_SIZE_IN = (11, 4.5)  # 1100 x 450 pixels


def machine_name(facts: dict[str, Any]) -> str:
  """'AMD EPYC ... (2 CPUs)' on CPU, '1 x NVIDIA H200' on an accelerator."""
  if facts.get("backend") == "cpu":
    return f"{facts.get('cpu_model', 'CPU')} ({facts.get('cpu_count', '?')} CPUs)"
  return f"{facts.get('device_count', 1)} x {facts.get('device_kind', facts.get('backend'))}"


def decode_groups(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
  """Rows by (system, dtype/format) in first-seen order, each group sorted by batch size."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for row in rows:
    groups.setdefault((row["system"], row["dtype"]), []).append(row)
  return {key: sorted(group, key=lambda r: r["batch"]) for key, group in groups.items()}


def plot_decode(results: dict[str, Any], path: str, model_name: str = "") -> str:
  """Writes decode tok/s against batch size (log2 x, log y), one line per (system, format), each
  with its roofline dashed in its colour; returns `path`.

  The roofline of a format is min(batch x bandwidth / weight bytes, compute ceiling): the same
  bandwidth and weight bytes as the table's ceiling column (results['config']['bandwidth_gbps'],
  each row's weight_bytes), and the compute ceiling of results['compute_roofline']
  (`jinfer.benchmark.compute_roofline`) when present; without it only the bandwidth bound is drawn.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import NullLocator  # pylint: disable=g-import-not-at-top
  rows, cfg = results["rows"], results["config"]
  gbps = cfg["bandwidth_gbps"]
  compute = results.get("compute_roofline")
  compute_tok_s = compute["compute_tok_s"] if compute else None
  batches = sorted({r["batch"] for r in rows})
  fig = Figure(figsize=DECODE_SIZE_IN, dpi=DPI)
  ax = fig.subplots()
  drawn_nbytes = set()  # formats of equal weight bytes share one roofline (e.g. two float32 rows)
  for i, ((system, dtype), group) in enumerate(decode_groups(rows).items()):
    color = f"C{i % 10}"
    ax.plot([r["batch"] for r in group], [r["decode_tok_s"] for r in group], "o-", color=color,
            label=f"{system} {dtype}")
    nbytes = next((r["weight_bytes"] for r in group if r.get("weight_bytes")), None)
    if nbytes and nbytes not in drawn_nbytes:
      drawn_nbytes.add(nbytes)
      # Drawn over every batch size of the plot: the ceiling exists at all of them.
      ax.plot(batches, [roofline_tok_s(b, nbytes, gbps, compute_tok_s) for b in batches], "--",
              color=color, alpha=0.6, linewidth=1)
  bound = "min(batch x bandwidth / weight bytes, compute)" if compute else (
      "batch x bandwidth / weight bytes (no compute ceiling measured)")
  ax.plot([], [], "k--", linewidth=1, label=f"roofline per format: {bound}, {gbps:.1f} GB/s")
  if compute:
    ax.axhline(compute_tok_s, color="grey", linestyle=":",
               label=f"compute ceiling: {compute['peak_flops'] / 1e9:.0f} GFLOP/s measured "
                     f"matmul FLOP/s / (2 x {compute['param_count'] / 1e6:.1f} M params)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.xaxis.set_minor_locator(NullLocator())  # only the measured batch sizes are labelled
  ax.set_yscale("log")
  ax.set_xlabel("batch size (sequences decoded together)")
  ax.set_ylabel("decode tokens/s (summed over the batch)")
  machine = machine_name(results.get("facts", {}))
  ax.set_title(f"{model_name + ' ' if model_name else ''}decode throughput on {machine}\n"
               f"prompt {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens, greedy, "
               f"best of {cfg['repeats']}", fontsize=10)
  ax.grid(alpha=0.3, which="major")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  return path


def _cdf(values_s: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(sorted values in ms, fraction of requests at or below each), starting from fraction 0 at
  the smallest value so the step curve rises from the axis."""
  values_ms = np.sort(np.asarray(values_s, dtype=np.float64)) * 1e3
  if not values_ms.size:  # no request of this kind (e.g. no TPOT: every output one token)
    return values_ms, values_ms
  fraction = np.arange(values_ms.size + 1) / values_ms.size
  return np.concatenate([values_ms[:1], values_ms]), fraction


def plot_serving(results: dict[str, Any], path: str, model_name: str = "") -> str:
  """Writes the TTFT and TPOT CDFs (one subplot each) of every serving row with per-request
  latencies (`request_ttft_s`, `request_tpot_s`: the engine's); returns `path`. Static batching
  rows have throughput only and are named in the title as not shown."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  cfg = results["config"]
  shown = [r for r in results["rows"] if "request_ttft_s" in r]
  not_shown = [r["system"] for r in results["rows"] if "request_ttft_s" not in r]
  fig = Figure(figsize=SERVING_SIZE_IN, dpi=DPI)
  axes = fig.subplots(1, 2)
  for ax, key, xlabel in ((axes[0], "request_ttft_s", "time to first token (ms)"),
                          (axes[1], "request_tpot_s", "time per output token after the first (ms)")):
    for i, row in enumerate(shown):
      values_ms, fraction = _cdf(row[key])
      ax.step(values_ms, fraction, where="post", color=f"C{i % 10}", label=row["system"])
    for q in (0.5, 0.95, 0.99):  # the percentiles the table prints
      ax.axhline(q, color="grey", linewidth=0.5, linestyle=":")
      ax.text(1.0, q, f" P{q * 100:.0f}", transform=ax.get_yaxis_transform(), fontsize=7,
              va="center", color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if shown:
      ax.legend(fontsize=8, loc="lower right")
  rate = cfg["request_rate"]
  arrivals = ("all submitted at once" if math.isinf(rate) else f"Poisson arrivals at {rate:g}/s")
  title = (f"{model_name + ': ' if model_name else ''}serving latency, {cfg['num_requests']} "
           f"requests {arrivals}, {cfg['max_num_seqs']} engine slots")
  if not_shown:
    title += "\nnot shown (no per-request latencies): " + "; ".join(not_shown)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  return path
