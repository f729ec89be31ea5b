"""The engine under load (experiments/sweeps/engine_load.py): Poisson arrival rates."""

from experiments import common


def get_config(arg: str | None = None):
  """The full sweep; arg "smoke": a random tiny model and a few points (under a minute)."""
  smoke = arg == "smoke"
  config = common.base_config("engine_load", smoke)
  config.request_rates = (4.0, float("inf")) if smoke else (0.5, 1.0, 2.0, 4.0, float("inf"))
  config.num_requests = 6 if smoke else 64
  config.min_prompt, config.max_prompt = (4, 24) if smoke else (32, 512)
  config.min_output, config.max_output = (2, 8) if smoke else (16, 256)
  config.max_num_seqs = 4 if smoke else 64
  config.max_batched_tokens = 64 if smoke else 2048
  return config
