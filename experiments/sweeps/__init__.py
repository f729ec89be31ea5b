"""One module per experiment, each with `num_points(config)` (checks the config's fields, before
anything loads, and counts the measured points for the progress bar) and
`run(config, model, progress) -> (results, figures)`, which calls `progress(1)` after each
point."""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("decoding", "quantization", "speculative", "batch_scaling", "mesh", "engine_load")


def module(name: str) -> ModuleType:
  """The sweep module of experiment `name`."""
  if name not in NAMES:
    raise ValueError(f"config.experiment must be one of {NAMES}; got {name!r}.")
  return importlib.import_module(f"experiments.sweeps.{name}")
