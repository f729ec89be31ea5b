"""Contiguous KV cache: one [B, K, S, H] buffer per layer for keys and for values.

Heads come before positions so attention's dots see (B, K) as leading batch dims and H as the
minor contraction dim: XLA then reads the cache in place instead of transposing it every step.

Row b of the batch keeps the key/value of its token at position p in slot p, so a query at position
p attends to slots 0..p. Slots past a row's last write hold stale values that the causal mask hides.

With dtype int8 the buffers hold int8 codes plus one float32 scale per (row, KV head, slot)
(`jinfer.quant.kv`): k_scales / v_scales [B, K, S] per layer, the buffers' layout minus H, so
every leaf keeps the batch as its leading dim and row gathers (`jax.tree.map(lambda x: x[rows],
cache)`, beam reordering) move codes and scales together. `keys_values` dequantizes to float32.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jinfer import cpu_kernels
from jinfer.models.attention import attention
from jinfer.models.config import LlamaConfig
from jinfer.models.rope import Rope
from jinfer.quant.kv import dequantize_kv, is_int8, quantize_kv


@flax.struct.dataclass
class KVCache:
  """Contiguous K/V cache: per layer k/v [B, K, S, H] (int8 ones with scales [B, K, S])."""

  k: tuple[jax.Array, ...]  # per layer: [B, K, S, H]
  v: tuple[jax.Array, ...]  # per layer: [B, K, S, H]
  # int8 caches only, per layer [B, K, S] float32; empty tuples otherwise (no pytree leaves).
  k_scales: tuple[jax.Array, ...] = ()
  v_scales: tuple[jax.Array, ...] = ()

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
    """A zeroed cache; dtype jnp.int8 stores int8 K/V with per-(token, head) float32 scales."""
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    scales = ()
    if is_int8(dtype):
      scales = tuple(jnp.ones(shape[:3], jnp.float32) for _ in range(config.n_layers))
    return cls(k=zeros, v=zeros, k_scales=scales, v_scales=scales)

  @property
  def max_len(self) -> int:
    """S: the positions each row can hold."""
    return self.k[0].shape[2]

  @property
  def quantized(self) -> bool:
    """Whether K/V are stored as int8 codes plus scales."""
    return bool(self.k_scales)

  def write(self, layer: int, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
            positions_BxT: jax.Array) -> "KVCache":
    """Stores the new keys/values of `layer` at their positions; out-of-range writes are dropped.

    An int8 cache quantizes them first (one scale per token and KV head).
    """
    batch_idx = jnp.arange(k_BxTxKxH.shape[0])[:, None]
    # Negative positions (padding) go past the end too: jnp indexing would wrap them to S - 1.
    slots_BxT = jnp.where(positions_BxT < 0, self.max_len, positions_BxT)
    # Advanced indices around a slice: the update is indexed [B, T, K, (H)], the new K/V's layout.
    put = lambda buffer, update: buffer.at[batch_idx, :, slots_BxT].set(
        update.astype(buffer.dtype), mode="drop")
    if not self.quantized:
      return self.replace(k=_replace_at(self.k, layer, put(self.k[layer], k_BxTxKxH)),
                          v=_replace_at(self.v, layer, put(self.v[layer], v_BxTxKxH)))
    (k_q, k_scale_BxTxK), (v_q, v_scale_BxTxK) = quantize_kv(k_BxTxKxH), quantize_kv(v_BxTxKxH)
    return self.replace(
        k=_replace_at(self.k, layer, put(self.k[layer], k_q)),
        v=_replace_at(self.v, layer, put(self.v[layer], v_q)),
        k_scales=_replace_at(self.k_scales, layer, put(self.k_scales[layer], k_scale_BxTxK)),
        v_scales=_replace_at(self.v_scales, layer, put(self.v_scales[layer], v_scale_BxTxK)))

  def keys_values(self, layer: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (k [B,K,S,H], v [B,K,S,H], key positions [S]) for attention (float32 if int8)."""
    positions_S = jnp.arange(self.max_len)
    if not self.quantized:
      return self.k[layer], self.v[layer], positions_S
    return (dequantize_kv(self.k[layer], self.k_scales[layer]),
            dequantize_kv(self.v[layer], self.v_scales[layer]), positions_S)

  def write_and_attend(self, layer: int, qkv_BxTxKxG2xH: jax.Array, rope: Rope,
                       positions_BxT: jax.Array) -> tuple[jax.Array, "KVCache"]:
    """RoPE on the projection's queries and keys, the new keys/values written at their
    positions, then causal attention [B, T, N, H] over this layer's cache.

    A decode step (T = 1) over a float cache is one CPU kernel (`cpu_kernels.decode_rope_attention`:
    no RoPE, scatter or attention ops per layer, and the cache written in place).
    """
    def unfused():
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = rope.split_qkv(qkv_BxTxKxG2xH)
      cache = self.write(layer, k_BxTxKxH, v_BxTxKxH, positions_BxT)
      return cache.attend(layer, q_BxTxNxH, positions_BxT), cache

    if qkv_BxTxKxG2xH.shape[1] != 1 or self.quantized:
      return unfused()

    def fallback():
      out_BxTxNxH, cache = unfused()
      return out_BxTxNxH[:, 0], cache.k[layer], cache.v[layer]

    out_BxNxH, k_BxKxSxH, v_BxKxSxH = cpu_kernels.decode_rope_attention(
        qkv_BxTxKxG2xH[:, 0], rope.cos_BxTxHh[:, 0], rope.sin_BxTxHh[:, 0], self.k[layer],
        self.v[layer], positions_BxT[:, 0], fallback=fallback)
    return out_BxNxH[:, None], self.replace(k=_replace_at(self.k, layer, k_BxKxSxH),
                                            v=_replace_at(self.v, layer, v_BxKxSxH))

  def attend(self, layer: int, q_BxTxNxH: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """Causal attention [B, T, N, H] of queries at `positions` over this layer's cache."""
    k_BxKxSxH, v_BxKxSxH, k_positions_S = self.keys_values(layer)
    out_BxTxNxH = attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, positions_BxT,
                            k_positions_S[None, :])
    # Dequantized K/V are float32: keep a bfloat16 model's activations bfloat16.
    return out_BxTxNxH.astype(q_BxTxNxH.dtype) if self.quantized else out_BxTxNxH


def _replace_at(items: tuple, index: int, value) -> tuple:
  return items[:index] + (value,) + items[index + 1:]
