"""Int8 KV cache quantizer: one symmetric float32 scale per cached vector (token, KV head).

Per (token, head) over the head dim, not per channel: a step writes each token's K/V once, so
its scale is fixed at write time and never revisited (per-channel scales would move as tokens
arrive and force requantizing the cache). It also lets attention skip dequantizing tiles: a
token's key scale multiplies that token's logit, (q . k_q) * s_k, and its value scale that
token's probability, sum_t (p_t * s_v[t]) * v_q[t]. Symmetric absmax / 127: the code is an
int8 in [-127, 127] (no -128, so negation is exact) and the rounding error of every element is
at most scale / 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127


def is_int8(dtype) -> bool:
  """Whether a cache dtype asks for the quantized (int8 + scales) layout."""
  return jnp.dtype(dtype) == jnp.int8


def quantize_kv(x___xH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Quantizes each vector over the last (head) dim: (int8 [..., H], float32 scale [...]).

  scale = max |x| / 127. An all-zero vector gets scale 1.0 (codes 0), never 0 or NaN, so
  dequantizing or dividing by a scale is always safe.
  """
  x32 = x___xH.astype(jnp.float32)
  scale___ = jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX
  scale___ = jnp.where(scale___ > 0, scale___, 1.0)
  q___xH = jnp.clip(jnp.round(x32 / scale___[..., None]), -INT8_MAX, INT8_MAX)
  return q___xH.astype(jnp.int8), scale___


def dequantize_kv(q___xH: jax.Array, scale___: jax.Array, dtype=jnp.float32) -> jax.Array:
  """int8 codes [..., H] times their per-vector scales [...], in `dtype`."""
  return (q___xH.astype(jnp.float32) * scale___[..., None]).astype(dtype)
