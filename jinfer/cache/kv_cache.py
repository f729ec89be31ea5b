"""Contiguous KV cache: one [B, K, S, H] buffer per layer for keys and for values.

Heads come before positions so attention's dots see (B, K) as leading batch dims and H as the
minor contraction dim: XLA then reads the cache in place instead of transposing it every step.

Row b of the batch keeps the key/value of its token at position p in slot p, so a query at position
p attends to slots 0..p. Slots past a row's last write hold stale values that the causal mask hides.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jinfer.models.attention import attention
from jinfer.models.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer: [B, K, S, H]
  v: tuple[jax.Array, ...]  # per layer: [B, K, S, H]

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return cls(k=zeros, v=zeros)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]

  def write(self, layer: int, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
            positions_BxT: jax.Array) -> "KVCache":
    """Stores the new keys/values of `layer` at their positions; out-of-range writes are dropped."""
    batch_idx = jnp.arange(k_BxTxKxH.shape[0])[:, None]
    # Advanced indices around a slice: the update is indexed [B, T, K, H], the new K/V's layout.
    k_layer = self.k[layer].at[batch_idx, :, positions_BxT].set(
        k_BxTxKxH.astype(self.k[layer].dtype), mode="drop")
    v_layer = self.v[layer].at[batch_idx, :, positions_BxT].set(
        v_BxTxKxH.astype(self.v[layer].dtype), mode="drop")
    return self.replace(k=_replace_at(self.k, layer, k_layer), v=_replace_at(self.v, layer, v_layer))

  def keys_values(self, layer: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (k [B,K,S,H], v [B,K,S,H], key positions [S]) for attention."""
    return self.k[layer], self.v[layer], jnp.arange(self.max_len)

  def attend(self, layer: int, q_BxTxNxH: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """Causal attention [B, T, N, H] of queries at `positions` over this layer's cache."""
    k_BxKxSxH, v_BxKxSxH, k_positions_S = self.keys_values(layer)
    return attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, positions_BxT, k_positions_S[None, :])


def _replace_at(items: tuple, index: int, value) -> tuple:
  return items[:index] + (value,) + items[index + 1:]
