"""Prefill (time to first token) against prompt length, jinfer and transformers in one run.

  jinfer benchmark --prefill_lengths=512,2048,8000 --peers=transformers

Each length: one prompt of exactly that many tokens (the benchmark text, repeated), greedy, one
new token. jinfer: `generate`'s prefill program (compile time excluded), best of `repeats` after
a warm-up. transformers: a float32 forward over the prompt with the KV cache and the last
position's logits only (what its `generate` does before the first token; SDPA attention), best
of `repeats` after a warm-up. The peak resident memory of the process is read after each
jinfer length (it only grows, so a length's figure bounds every length before it).
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable, Optional, Sequence

from jinfer.benchmark import (PeerContext, PeerUnavailable, advance, build_prompt_ids,
                              load_transformers_model)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_jinfer_prefill(model, prompt_ids: Sequence[int], repeats: int) -> dict[str, float]:
  """Best-of-`repeats` seconds of jinfer's prefill of one prompt (after a compiling run)."""
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  params = jinfer.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
  generate_with_stats(model, [list(prompt_ids)], params)
  seconds = min(generate_with_stats(model, [list(prompt_ids)], params)[1].prefill_s
                for _ in range(repeats))
  return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def bench_transformers_prefill(torch_model, prompt_ids: Sequence[int], repeats: int) -> float:
  """Best-of-`repeats` seconds of transformers' forward over the prompt with its KV cache."""
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.tensor([list(prompt_ids)])

  def once() -> float:
    start = time.perf_counter()
    with torch.inference_mode():
      torch_model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start

  once()
  return min(once() for _ in range(repeats))


def run_prefill(model, lengths: Sequence[int], peers: Sequence[str], ctx: Optional[PeerContext],
                repeats: int = 2, log: Callable[[str], None] = print,
                progress=None) -> dict[str, Any]:
  """One row per prompt length (jinfer, and transformers when asked for and available);
  `progress` (a tqdm bar) moves on by one per length."""
  rows = []
  torch_model, skipped = None, {}
  if "transformers" in peers:
    try:
      if ctx is None:
        raise PeerUnavailable("no checkpoint path to give it (the model was passed in memory).")
      torch_model = load_transformers_model(ctx)
    except PeerUnavailable as e:
      skipped["transformers"] = str(e)
  for length in lengths:
    prompt = build_prompt_ids(model.tokenizer, length)
    log(f"prefill {length} tokens: jinfer ...")
    row = {"tokens": length, **{f"jinfer_{k}": v for k, v in
                                bench_jinfer_prefill(model, prompt, repeats).items()}}
    if torch_model is not None:
      log(f"prefill {length} tokens: transformers ...")
      row["transformers_seconds"] = bench_transformers_prefill(torch_model, prompt, repeats)
    rows.append(row)
    advance(progress)
  return {"rows": rows, "skipped": skipped, "repeats": repeats}


def format_prefill(results: dict[str, Any]) -> str:
  """Markdown table of the prefill results, one row per prompt length."""
  rows = results["rows"]
  first = rows[0]
  lines = ["| prompt tokens | jinfer s | jinfer tok/s | transformers s | jinfer vs transformers | "
           "jinfer time / (length ratio)^2 | peak RSS MB |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    theirs = row.get("transformers_seconds")
    # Time against the causal triangle's growth: 1.0 means quadratic from the first length.
    growth = row["jinfer_seconds"] / first["jinfer_seconds"] / (row["tokens"] / first["tokens"])**2
    lines.append(
        f"| {row['tokens']} | {row['jinfer_seconds']:.2f} | "
        f"{row['tokens'] / row['jinfer_seconds']:.0f} | "
        + (f"{theirs:.2f} | {theirs / row['jinfer_seconds']:.2f}x" if theirs else "- | -")
        + f" | {growth:.2f} | {row['jinfer_peak_rss_mb']:.0f} |")
  lines += [f"{name}: skipped: {why}" for name, why in results["skipped"].items()]
  return "\n".join(lines)


def plot_prefill(results: dict[str, Any], path: str) -> str:
  """Writes a PNG of prompt tokens/s against prompt length (log x), one line per system; returns
  the path."""
  # A bare Figure renders with Agg on savefig: no display, and no pyplot state or backend switch
  # in the caller's process.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  rows = results["rows"]
  lengths = [r["tokens"] for r in rows]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  ax.plot(lengths, [r["tokens"] / r["jinfer_seconds"] for r in rows], "o-", label="jinfer")
  if all("transformers_seconds" in r for r in rows):
    ax.plot(lengths, [r["tokens"] / r["transformers_seconds"] for r in rows], "s--",
            label="transformers (SDPA)")
  ax.set(xscale="log", xlabel="prompt tokens", ylabel="prefill tokens/s",
         title="Prefill throughput against prompt length")
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
