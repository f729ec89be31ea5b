"""Regression checks for `jinfer benchmark`: the ratios a decode run measures, and their
comparison with a baseline recorded in the repository.

Absolute times on shared machines move by +-20% from run to run; ratios of figures measured in
the same run (a format against its bandwidth ceiling, batch 8 against batch 1, int4 against
int8, jinfer against a peer) move far less, so those are what is recorded and checked. Still,
one run's ratios spread by up to ~15% here, so a baseline is recorded from several runs of the
same command and keeps each ratio's lowest value (`record` merges into an existing file). A
ratio more than `TOLERANCE` below its baseline is a regression; one the run did not measure (a
peer not installed) is reported, not failed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from jinfer.errors import InvalidRequestError

TOLERANCE = 0.10
QUANTIZED_PAIRS = (("int4", "int8"), ("int4-emb8", "int8-emb8"))


def run_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """The ratios of one decode run's rows (`run_benchmark`'s results["rows"]), by name."""
  tok_s = {(r["system"], r["dtype"], r["batch"]): r["decode_tok_s"] for r in rows}
  ratios = {}
  for r in rows:
    if r["system"] == "jinfer" and r["batch"] == 1 and r.get("bandwidth_fraction"):
      ratios[f"jinfer {r['dtype']} batch 1: of bandwidth ceiling"] = r["bandwidth_fraction"]
  for (system, dtype, batch), value in tok_s.items():
    if system == "jinfer" and batch > 1 and (system, dtype, 1) in tok_s:
      ratios[f"jinfer {dtype}: batch {batch} / batch 1"] = value / tok_s[(system, dtype, 1)]
  for low, high in QUANTIZED_PAIRS:
    for (system, dtype, batch), value in tok_s.items():
      if system == "jinfer" and dtype == low and (system, high, batch) in tok_s:
        ratios[f"jinfer {low} / {high} at batch {batch}"] = value / tok_s[(system, high, batch)]
  for (system, dtype, batch), value in tok_s.items():
    if system == "transformers" and ("jinfer", dtype, batch) in tok_s:
      ratios[f"jinfer {dtype} / transformers {dtype} at batch {batch}"] = (
          tok_s[("jinfer", dtype, batch)] / value)
    if system == "llama_cpp":  # its own file's format: every jinfer format at the same batch
      for (other, fmt, b), mine in tok_s.items():
        if other == "jinfer" and b == batch:
          ratios[f"jinfer {fmt} / llama_cpp at batch {batch}"] = mine / value
  return ratios


def load_baseline(path: str | os.PathLike) -> dict[str, float]:
  """The ratios recorded at `path` (written by `record`); checked before any measuring."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise InvalidRequestError(f"--check: baseline {str(path)!r} does not exist; record one "
                              f"with --record_baseline=PATH.") from None
  except (OSError, json.JSONDecodeError) as e:
    raise InvalidRequestError(f"--check: baseline {str(path)!r} is not readable JSON ({e}); "
                              f"record it again with --record_baseline=PATH.") from None
  ratios = data.get("ratios") if isinstance(data, dict) else None
  if not isinstance(ratios, dict) or not ratios or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
      for v in ratios.values()):
    raise InvalidRequestError(f"--check: baseline {str(path)!r} has no non-empty 'ratios' "
                              f"object of positive numbers; record it again with "
                              f"--record_baseline=PATH.")
  return {str(k): float(v) for k, v in ratios.items()}


def compare(measured: dict[str, float], baseline: dict[str, float],
            tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
  """One row per baseline ratio: its baseline and measured values and a status, 'ok',
  'regressed' (more than `tolerance` below the baseline) or 'not measured'."""
  rows = []
  for name, base in baseline.items():
    value = measured.get(name)
    status = ("not measured" if value is None else
              "regressed" if value < (1 - tolerance) * base else "ok")
    rows.append({"ratio": name, "baseline": base, "measured": value, "status": status})
  return rows


def regressions(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The names of the ratios `compare` found regressed."""
  return [r["ratio"] for r in rows if r["status"] == "regressed"]


def format_check(rows: Sequence[dict[str, Any]], tolerance: float = TOLERANCE) -> str:
  """Markdown table of `compare`'s rows."""
  lines = [f"regression check (a ratio fails more than {tolerance:.0%} below its baseline):", "",
           "| ratio | baseline | this run | vs baseline | status |", "|---|---|---|---|---|"]
  for r in rows:
    got = "-" if r["measured"] is None else f"{r['measured']:.3f}"
    rel = "-" if r["measured"] is None else f"{r['measured'] / r['baseline'] - 1:+.1%}"
    lines.append(f"| {r['ratio']} | {r['baseline']:.3f} | {got} | {rel} | {r['status']} |")
  return "\n".join(lines)


def record(path: str | os.PathLike, ratios: dict[str, float], facts: dict[str, Any],
           command: str) -> int:
  """Writes a baseline (the ratios, the machine and the command), or merges this run into the
  one at `path` recorded with the same command: each ratio keeps its lowest value. Returns how
  many runs the baseline now holds."""
  if not ratios:
    raise InvalidRequestError("--record_baseline: this run measured no ratio (it needs batch 1 "
                              "rows, or two batch sizes, formats or systems); nothing written.")
  runs = 1
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("command") == command:
      runs += int(old.get("runs", 1))
      ratios = {name: min(value, old["ratios"].get(name, value))
                for name, value in {**old["ratios"], **ratios}.items()}
  with open(path, "w") as f:
    json.dump({"command": command, "machine": facts, "runs": runs, "ratios": ratios}, f,
              indent=2, sort_keys=True)
    f.write("\n")
  return runs
