"""The quantization sweep (experiments/sweeps/quantization.py): format x group size."""

from experiments import common


def get_config(arg: str | None = None):
  """The full sweep; arg "smoke": a random tiny model and a few points (under a minute)."""
  smoke = arg == "smoke"
  config = common.base_config("quantization", smoke)
  config.formats = ("float32", "int8", "int4") if smoke else (
      "float32", "bfloat16", "int8", "w8a8", "int4")
  config.group_sizes = (32,) if smoke else (32, 64)  # must divide SmolLM2's 576 and 1536
  config.eval_tokens = 64 if smoke else 2048  # perplexity on the evaluation text
  config.prompt_tokens = 16 if smoke else 64
  config.new_tokens = 8 if smoke else 64
  config.repeats = 1 if smoke else 2
  return config
