"""Frozen, hashable architecture configs for the Llama family, with named presets."""

from __future__ import annotations

import dataclasses
from typing import Optional

from jinfer.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `kind` is 'linear' or 'llama3' (Llama 3.1 style)."""

  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


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
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
          "grouped-query attention needs each KV head shared by a whole number of query heads.")

  @property
  def group_size(self) -> int:
    """Query heads per KV head (1 for MHA, n_heads for MQA)."""
    return self.n_heads // self.n_kv_heads


def config_from_fields(source: str, **fields) -> LlamaConfig:
  """A LlamaConfig read from a checkpoint; inconsistent fields become a CheckpointError."""
  try:
    return LlamaConfig(**fields)
  except ValueError as e:  # LlamaConfig's own consistency checks.
    raise CheckpointError(f"{source} describes an invalid model: {e}") from e


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
