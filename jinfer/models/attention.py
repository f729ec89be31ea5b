"""The XLA attention math shared by the model (no cache) and the KV caches' `attend`.

A module of its own so the caches can use it without importing the model (which imports them).
Long query chunks (prefill) go blockwise (`blockwise_attention`): FlashAttention's online softmax
over blocks of keys, skipping blocks no query of the block can see, so the work follows the
causal triangle and no [T, S] score matrix exists.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


BLOCK = 256  # queries and keys per block of the blockwise path
BLOCKWISE_MIN_QUERIES = 512  # shorter chunks: one dense pass is cheaper than the loop


def attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, k_positions_BxS, *,
              sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
  """Causal grouped-query attention by position: a query sees keys at positions <= its own
  (and, with a sliding window W, > its own - W); soft_cap caps the scaled logits Gemma-style,
  cap * tanh(s / cap)."""
  fn = (blockwise_attention if q_BxTxNxH.shape[1] >= BLOCKWISE_MIN_QUERIES else dense_attention)
  return fn(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, k_positions_BxS,
            sliding_window=sliding_window, soft_cap=soft_cap)


def _visible(k_positions_BxS, q_positions_BxT, sliding_window: int | None) -> jax.Array:
  """[B, T, S]: which keys each query sees."""
  k_pos, q_pos = k_positions_BxS[:, None, :], q_positions_BxT[:, :, None]
  visible = k_pos <= q_pos
  if sliding_window is not None:
    visible &= k_pos > q_pos - sliding_window
  return visible


def _scaled_scores(scores, head_dim: int, soft_cap: float | None):
  scores = scores / math.sqrt(head_dim)
  return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def dense_attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, k_positions_BxS, *,
                    sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
  """`attention` in one pass over a [T, S] score matrix (the reference)."""
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxKxSxH.shape[1]
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = _scaled_scores(jnp.einsum("BTKGH,BKSH->BKGTS", q_BxTxKxGxH, k_BxKxSxH,
                                     preferred_element_type=jnp.float32), h, soft_cap)
  visible_BxTxS = _visible(k_positions_BxS, q_positions_BxT, sliding_window)
  scores = jnp.where(visible_BxTxS[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BxKxSxH)
  return out.reshape(b, t, n, h)


def _pad_to_block(x, axis: int, block: int, value=0):
  pad = -x.shape[axis] % block
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, k_positions_BxS, *,
                        block: int = BLOCK, sliding_window: int | None = None,
                        soft_cap: float | None = None) -> jax.Array:
  """`attention` a block of queries against a block of keys at a time.

  Per query block, a running max, normalizer and weighted sum of values are updated block by
  block of keys (FlashAttention's recurrence). Key blocks whose first position is past every
  position of the query block, or (with a sliding window) whose last is before every query's
  window, are never visited: keys must be in ascending position order (as every cache stores
  them), which makes the cost the causal triangle (or band) rather than T x S.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxKxSxH.shape[1]
  dtype = q_BxTxNxH.dtype
  q = _pad_to_block(q_BxTxNxH, 1, block)
  q_positions = _pad_to_block(q_positions_BxT, 1, block, value=-1)  # padded queries see nothing
  k = _pad_to_block(k_BxKxSxH, 2, block)
  v = _pad_to_block(v_BxKxSxH, 2, block)
  k_positions = _pad_to_block(k_positions_BxS, 1, block, value=jnp.iinfo(jnp.int32).max)
  k_positions = jnp.broadcast_to(k_positions, (b, k_positions.shape[1]))
  num_q, num_k = q.shape[1] // block, k.shape[2] // block
  q_blocks = q.reshape(b, num_q, block, kv_heads, n // kv_heads, h).transpose(1, 0, 3, 4, 2, 5)
  q_pos_blocks = q_positions.reshape(b, num_q, block).transpose(1, 0, 2)
  # The first position of each key block (any row): blocks starting past a query block's last
  # position are skipped.
  k_block_starts = k_positions.reshape(b, num_k, block).min(axis=(0, 2))
  k_block_ends = k_positions.reshape(b, num_k, block).max(axis=(0, 2))

  def one_query_block(args):
    q_BxKxGxQxH, q_pos_BxQ = args
    # Through the last key block that starts at or before the block's last query.
    visible_blocks = jnp.max(jnp.where(k_block_starts <= q_pos_BxQ.max(),
                                       jnp.arange(1, num_k + 1), 0))
    first_block = 0
    if sliding_window is not None:  # from the first key block reaching any query's window
      first_seen = jnp.min(jnp.where(q_pos_BxQ >= 0, q_pos_BxQ, jnp.iinfo(jnp.int32).max))
      first_block = jnp.argmax(k_block_ends > first_seen - sliding_window)

    def key_block(j, carry):
      running_max, total, acc = carry
      k_blk = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
      v_blk = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
      k_pos = jax.lax.dynamic_slice_in_dim(k_positions, j * block, block, axis=1)
      scores = _scaled_scores(jnp.einsum("BKGQH,BKSH->BKGQS", q_BxKxGxQxH, k_blk,
                                         preferred_element_type=jnp.float32), h, soft_cap)
      visible = _visible(k_pos, q_pos_BxQ, sliding_window)
      scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
      new_max = jnp.maximum(running_max, scores.max(axis=-1))
      correction = jnp.exp(running_max - new_max)
      probs = jnp.exp(scores - new_max[..., None])
      total = total * correction + probs.sum(axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "BKGQS,BKSH->BKGQH", probs.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
      return new_max, total, acc

    shape = q_BxKxGxQxH.shape[:-1]
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_BxKxGxQxH.shape, jnp.float32))
    _, total, acc = jax.lax.fori_loop(first_block, visible_blocks, key_block, init)
    return (acc / jnp.maximum(total, 1e-30)[..., None]).astype(dtype)

  out = jax.lax.map(one_query_block, (q_blocks, q_pos_blocks))  # [nq, B, K, G, Q, H]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, num_q * block, n, h)
  return out[:, :t]
