"""Rotary position embeddings (RoPE): a config's inverse frequencies (with linear or Llama-3
scaling), and the cos/sin of a batch's positions applied to queries and keys."""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models.config import LlamaConfig, RopeScaling


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """The per-pair RoPE frequencies [H/2], with linear or Llama-3 scaling applied."""
  exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.kind == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  if scaling.kind == "llama3":
    return _llama3_scaled(inv_freq, scaling).astype(np.float32)
  raise ValueError(f"Unknown rope scaling kind {scaling.kind!r}; use 'linear' or 'llama3'.")


def _llama3_scaled(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = s.original_max_position / s.low_freq_factor
  high_freq_wavelen = s.original_max_position / s.high_freq_factor
  smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  ramp = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
  return np.where(is_medium, ramp, scaled)


@flax.struct.dataclass
class Rope:
  """cos/sin of every (position, frequency) angle of a batch, computed once for all layers."""

  cos_BxTxHh: jax.Array
  sin_BxTxHh: jax.Array

  @classmethod
  def at(cls, positions_BxT: jax.Array, inv_freq: np.ndarray) -> "Rope":
    """cos/sin [B, T, H/2] of positions_BxT times each inverse frequency."""
    angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    return cls(jnp.cos(angles), jnp.sin(angles))

  def apply(self, x_BxTx___xH: jax.Array) -> jax.Array:
    """Half-rotation RoPE (Hugging Face layout): pairs are (i, i + H/2); any heads dims."""
    extra = (1,) * (x_BxTx___xH.ndim - 3)
    b, t, half = self.cos_BxTxHh.shape
    cos = self.cos_BxTxHh.reshape(b, t, *extra, half)
    sin = self.sin_BxTxHh.reshape(b, t, *extra, half)
    x1, x2 = jnp.split(x_BxTx___xH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTx___xH.dtype)

  def split_qkv(self, qkv_BxTxKxG2xH: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused projection's output [B, T, K, G + 2, H] (per KV head: its G query heads, its
    key, its value) -> RoPE'd q [B, T, N, H], RoPE'd k [B, T, K, H] and v [B, T, K, H]."""
    b, t, _, _, h = qkv_BxTxKxG2xH.shape
    q_BxTxNxH = self.apply(qkv_BxTxKxG2xH[:, :, :, :-2]).reshape(b, t, -1, h)
    return q_BxTxNxH, self.apply(qkv_BxTxKxG2xH[:, :, :, -2]), qkv_BxTxKxG2xH[:, :, :, -1]
