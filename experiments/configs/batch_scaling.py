"""Batch-size scaling with the roofline (experiments/sweeps/batch_scaling.py)."""

from experiments import common


def get_config(arg: str | None = None):
  """The full sweep; arg "smoke": a random tiny model and a few points (under a minute)."""
  smoke = arg == "smoke"
  config = common.base_config("batch_scaling", smoke)
  config.batch_sizes = (1, 2, 4) if smoke else (1, 2, 4, 8, 16, 32, 64)
  config.prompt_tokens = 16 if smoke else 64
  config.new_tokens = 8 if smoke else 64
  config.repeats = 1 if smoke else 2
  return config
