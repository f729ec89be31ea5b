r"""Runs one experiment from an ml_collections config and writes its results and plots.

  python -m experiments.run --config=experiments/configs/batch_scaling.py --workdir=/tmp/runs
  python -m experiments.run --config=experiments/configs/batch_scaling.py:smoke \
      --config.batch_sizes=1,2 --workdir=/tmp/runs

`--config=FILE:ARG` passes ARG to the file's get_config ("smoke": a random tiny model and few
points, under a minute on a laptop CPU); `--config.FIELD=VALUE` overrides a field. The run folder
WORKDIR/NAME-TIMESTAMP/ gets config.json, results.json and the experiment's PNG plots; a
progress bar on stderr counts the measured points (off with --noprogress).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An experiments/configs/NAME.py file, optionally with ':smoke'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run folder is created.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  """Checks the config, loads its model, runs its sweep and writes the run folder."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not os.path.isdir(_WORKDIR.value):
    raise app.UsageError(f"--workdir: directory {_WORKDIR.value!r} does not exist; create it.")
  # Fake CPU devices must be asked for before JAX starts its backends (the mesh sweep).
  devices = config.get("cpu_devices", 0)
  if devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}")
  import tqdm  # pylint: disable=g-import-not-at-top
  from experiments import common, sweeps  # pylint: disable=g-import-not-at-top
  sweep = sweeps.module(config.experiment)
  total = sweep.num_points(config)  # checks the config first
  model = common.load(config)
  folder = common.run_folder(_WORKDIR.value, config.name)  # only once there is something to run
  with tqdm.tqdm(total=total, desc=config.name, file=sys.stderr,
                 disable=not _PROGRESS.value or not sys.stderr.isatty()) as bar:
    results, figures = sweep.run(config, model, progress=bar.update)
  for path in common.write(folder, config, results, figures):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
