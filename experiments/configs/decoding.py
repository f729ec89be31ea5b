"""Decoding strategies compared (experiments/sweeps/decoding.py)."""

from experiments import common


def get_config(arg: str | None = None):
  """The full sweep; arg "smoke": a random tiny model and a few points (under a minute)."""
  smoke = arg == "smoke"
  config = common.base_config("decoding", smoke)
  config.strategies = ("greedy", "sampling", "beam", "speculative-ngram", "speculative-self")
  config.prompts = ("The capital of France is", "Alice was beginning to get very tired")
  config.max_tokens = 8 if smoke else 64
  config.temperature = 0.8
  config.top_p = 0.95
  config.beam_width = 2 if smoke else 4
  config.num_draft_tokens = 4
  config.repeats = 1 if smoke else 3
  return config
