"""The XLA attention math shared by the model (no cache) and the KV caches' `attend`.

A module of its own so the caches can use it without importing the model (which imports them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


def attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, k_positions_BxS) -> jax.Array:
  """Causal grouped-query attention by position: a query sees keys at positions <= its own."""
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxKxSxH.shape[1]
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BTKGH,BKSH->BKGTS", q_BxTxKxGxH, k_BxKxSxH,
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  visible_BxTxS = k_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
  scores = jnp.where(visible_BxTxS[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BxKxSxH)
  return out.reshape(b, t, n, h)
