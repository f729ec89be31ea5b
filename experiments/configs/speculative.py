"""The speculative-decoding sweep (experiments/sweeps/speculative.py): method x k."""

from experiments import common


def get_config(arg: str | None = None):
  """The full sweep; arg "smoke": a random tiny model and a few points (under a minute)."""
  smoke = arg == "smoke"
  config = common.base_config("speculative", smoke)
  config.methods = ("ngram", "self")
  config.num_draft_tokens = (2, 4) if smoke else (1, 2, 4, 8)
  config.workloads = ("continue",) if smoke else ("continue", "copy")
  config.prompt_tokens = 16 if smoke else 128
  config.max_tokens = 8 if smoke else 64
  config.repeats = 1 if smoke else 2
  return config
