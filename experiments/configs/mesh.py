"""The mesh-shape sweep (experiments/sweeps/mesh.py): 8 fake CPU devices here; on a TPU VM pass
--config.cpu_devices=0 and meshes that multiply to the chip count."""

from experiments import common


def get_config(arg: str | None = None):
  """The full sweep; arg "smoke": a random tiny model and a few points (under a minute)."""
  smoke = arg == "smoke"
  config = common.base_config("mesh", smoke)
  config.cpu_devices = 8  # XLA_FLAGS=--xla_force_host_platform_device_count; 0: real devices
  config.meshes = ("1x1", "1x2", "2x1") if smoke else (
      "1x1", "1x2", "2x1", "1x4", "2x2", "4x1", "1x8", "2x4", "4x2", "8x1")
  config.batch_sizes = (1, 2) if smoke else (1, 8)
  config.prompt_tokens = 16 if smoke else 64
  config.new_tokens = 4 if smoke else 32
  config.repeats = 1
  return config
