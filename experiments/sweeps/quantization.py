"""The quantization sweep: weight format x group size against perplexity, parameter bytes and
batch-1 decode speed, with a plot of quality against speed.

The formats quantize the model as loaded in float: for the default model that is its GGUF Q4_1
file dequantized, so int4 with groups of 32 lands back on the file's own grid (no loss), and
every other point pays for rounding twice."""

from __future__ import annotations

from experiments import common
from jinfer.benchmark import (BenchConfig, bench_jinfer_point, cast_model, measured_read_gbps,
                              weight_bytes)
from jinfer.evaluate import perplexity

FORMATS = ("float32", "bfloat16", "int8", "w8a8", "int4")


def variants(config) -> list[tuple[str, str, int | None]]:
  """(label, format, group size) of each point: float formats and w8a8 once (w8a8 is per
  channel), int8 per channel (group None) and per group, int4 per group."""
  points = []
  for fmt in config.formats:
    if fmt not in FORMATS:
      raise ValueError(f"config.formats: unknown format {fmt!r}; choose from {FORMATS}.")
    groups = list(config.group_sizes)
    if fmt in ("float32", "bfloat16", "w8a8"):
      groups = [None]
    elif fmt == "int8":
      groups = [None] + groups
    points += [(fmt if g is None else f"{fmt}/g{g}", fmt, g) for g in groups]
  return points


def num_points(config) -> int:
  """Checks the config's fields and counts the points the run measures."""
  return len(variants(config))


def _variant(model, fmt: str, group_size: int | None):
  if fmt in ("float32", "bfloat16"):
    return cast_model(model, fmt)
  return model.quantize(fmt, group_size=group_size)


def run(config, model, progress) -> tuple[common.Results, common.Figures]:
  """Measures every point (calling progress(1) after each); returns (results, figures)."""
  eval_ids = common.prompt_ids(model, config.eval_tokens)
  prompt = common.prompt_ids(model, config.prompt_tokens)
  bench = BenchConfig(batch_sizes=(1,), prompt_tokens=config.prompt_tokens,
                      new_tokens=config.new_tokens, repeats=config.repeats,
                      bandwidth_gbps=measured_read_gbps())
  rows = []
  for label, fmt, group_size in variants(config):
    variant = _variant(model, fmt, group_size)
    speed = bench_jinfer_point(variant, prompt, 1, bench, label)
    rows.append({"variant": label, "format": fmt, "group_size": group_size,
                 "param_bytes": weight_bytes(variant.params),
                 "perplexity": perplexity(variant, token_ids=eval_ids),
                 "decode_tok_s": speed.decode_tok_s, "ms_per_step": speed.ms_per_step,
                 "of_bandwidth_ceiling": speed.bandwidth_fraction})
    progress(1)
  base = rows[0]
  for row in rows:
    row["bytes_vs_first"] = row["param_bytes"] / base["param_bytes"]
    row["perplexity_vs_first"] = row["perplexity"] / base["perplexity"] - 1
  title = f"Quantization ({config.model}, {config.eval_tokens} tokens)"
  quality, ax = common.figure(title, "decode tokens / s (batch 1)", "perplexity (lower is better)")
  ax.scatter([r["decode_tok_s"] for r in rows], [r["perplexity"] for r in rows],
             s=[20 + 200 * r["bytes_vs_first"] for r in rows], alpha=0.7)
  for r in rows:
    ax.annotate(r["variant"], (r["decode_tok_s"], r["perplexity"]), fontsize=8,
                xytext=(4, 4), textcoords="offset points")
  size, ax = common.figure(title, "parameter MB", "perplexity (lower is better)")
  ax.scatter([r["param_bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows])
  for r in rows:
    ax.annotate(r["variant"], (r["param_bytes"] / 1e6, r["perplexity"]), fontsize=8,
                xytext=(4, 4), textcoords="offset points")
  return {"rows": rows}, {"quality_vs_speed": quality, "quality_vs_size": size}
