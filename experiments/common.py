"""What every sweep shares: the model a config names, timing, the run folder and the plots."""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

import jinfer
from jinfer.evaluate import default_text
from jinfer.model import random_model
from jinfer.models.config import PRESETS

Results = dict[str, Any]
Figures = dict[str, Figure]  # file stem -> figure


def base_config(experiment: str, smoke: bool) -> ml_collections.ConfigDict:
  """Fields every experiment has. `model` is a registry name or checkpoint path, or a preset
  config name (e.g. "tiny-gqa") for random weights with a byte tokenizer (smoke runs)."""
  config = ml_collections.ConfigDict()
  config.experiment = experiment
  config.name = f"{experiment}-smoke" if smoke else experiment
  config.model = "tiny-gqa" if smoke else "smollm2-135m-instruct"
  config.dtype = "float32"
  config.seed = 0
  return config


def load(config: ml_collections.ConfigDict) -> jinfer.Model:
  """The model `config.model` names, in `config.dtype`."""
  if config.model in PRESETS:
    return random_model(config.model, seed=config.seed, dtype=config.dtype)
  return jinfer.load_model(config.model, dtype=config.dtype)


def prompt_ids(model: jinfer.Model, num_tokens: int) -> list[int]:
  """A prompt of exactly `num_tokens` tokens of the evaluation text (repeated if short)."""
  ids = model.tokenizer.encode(default_text())
  return (ids * math.ceil(num_tokens / len(ids)))[:num_tokens]


def seconds(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
  """(result, best wall time of `repeats` runs) after one untimed warm-up run (compiles)."""
  result = fn()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return result, best


def figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
  """A one-axes figure (no pyplot state: safe in threads and without a display)."""
  fig = Figure(figsize=(6.4, 4.4), layout="constrained")
  ax = fig.add_subplot()
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(True, alpha=0.3)
  return fig, ax


def run_folder(workdir: str | pathlib.Path, name: str) -> pathlib.Path:
  """WORKDIR/NAME-YYYYmmdd-HHMMSS, created (a suffix keeps two runs in one second apart)."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  folder = pathlib.Path(workdir) / f"{name}-{stamp}"
  suffix = 1
  while folder.exists():
    suffix += 1
    folder = pathlib.Path(workdir) / f"{name}-{stamp}-{suffix}"
  folder.mkdir(parents=True)
  return folder


def write(folder: pathlib.Path, config: ml_collections.ConfigDict, results: Results,
          figures: Figures) -> list[pathlib.Path]:
  """config.json, results.json and one PNG per figure; returns the paths written."""
  paths = [folder / "config.json", folder / "results.json"]
  strict = lambda obj: json.dumps(_finite(obj), indent=2, sort_keys=True, default=_plain,
                                  allow_nan=False) + "\n"
  paths[0].write_text(strict(config.to_dict()))
  paths[1].write_text(strict(results))
  for stem, fig in figures.items():
    paths.append(folder / f"{stem}.png")
    fig.savefig(paths[-1], dpi=120)
  return paths


def _finite(value: Any) -> Any:
  """`value` with infinities and NaNs as the strings "inf", "-inf", "nan": strict JSON (an
  arrival rate of inf means every request at once)."""
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  if isinstance(value, (float, np.floating)) and not math.isfinite(value):
    return str(float(value))
  return value


def _plain(value: Any) -> Any:
  """JSON for numpy scalars and arrays in results."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"results hold a {type(value).__name__}, which JSON cannot store")
