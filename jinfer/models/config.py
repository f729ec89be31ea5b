"""Frozen, hashable architecture configs for the Llama family, with named presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from jinfer.errors import CheckpointError, ConfigError

ROPE_SCALING_KINDS = ("linear", "llama3")


def _check_positive_ints(config, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(config, name)
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or value < 1:
      raise ConfigError(f"{type(config).__name__}.{name} must be a positive integer; got "
                        f"{value!r}.")
    # numpy scalars become Python ones: configs are saved as JSON.
    object.__setattr__(config, name, int(value))


def _check_positive_numbers(config, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(config, name)
    # Ints are fine (rope_theta=10000); bools, NaN and inf are not.
    ok = (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) and value > 0)
    if not ok:
      raise ConfigError(f"{type(config).__name__}.{name} must be a finite positive number; got "
                        f"{value!r}.")
    if isinstance(value, (np.integer, np.floating)):
      object.__setattr__(config, name, value.item())


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `kind` is 'linear' or 'llama3' (Llama 3.1 style)."""

  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALING_KINDS:
      raise ConfigError(f"RopeScaling.kind {self.kind!r} is not supported; use one of "
                        f"{list(ROPE_SCALING_KINDS)}.")
    # original_max_position too: GGUF files only give a fitted (maybe fractional) value.
    _check_positive_numbers(
        self, ("factor", "low_freq_factor", "high_freq_factor", "original_max_position"))
    # Llama 3 scaling interpolates between the two wavelength bounds: it divides by their gap.
    if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ConfigError(
          f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed "
          f"low_freq_factor={self.low_freq_factor} for llama3 scaling.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (Llama, Mistral without window, Qwen2, SmolLM)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10_000.0
  rope_scaling: Optional[RopeScaling] = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  max_seq_len: int = 2048
  architecture: str = "llama"

  def __post_init__(self):
    """Rejects values the model cannot run with, before they become shape errors inside JAX."""
    _check_positive_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                "head_dim", "d_ff", "max_seq_len"))
    _check_positive_numbers(self, ("rope_theta", "norm_eps"))
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
          f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
          "grouped-query attention needs each KV head shared by a whole number of query heads.")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dims.")
    if not (self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling)):
      raise ConfigError(f"LlamaConfig.rope_scaling must be None or a RopeScaling; got "
                        f"{self.rope_scaling!r}.")
    for name in ("tie_embeddings", "qkv_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"LlamaConfig.{name} must be True or False; got "
                          f"{getattr(self, name)!r}.")
    if not isinstance(self.architecture, str):
      raise ConfigError(f"LlamaConfig.architecture must be a string; got {self.architecture!r}.")

  @property
  def group_size(self) -> int:
    """Query heads per KV head (1 for MHA, n_heads for MQA)."""
    return self.n_heads // self.n_kv_heads


def invalid_config(source: str, error: ConfigError) -> CheckpointError:
  """The CheckpointError for a checkpoint whose config fails LlamaConfig's checks."""
  return CheckpointError(f"{source} describes an invalid model: {error} Fix the value in "
                         f"{source}, or re-download, re-convert or re-save the checkpoint.")


SMOLLM2_135M = LlamaConfig(
    vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
    d_ff=1536, rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)

# Tiny random configs for fast tests; one per feature the loaders and model must handle.
TINY_GQA = LlamaConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
    max_seq_len=256)

PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": SMOLLM2_135M,
    "tiny-gqa": TINY_GQA,
}
