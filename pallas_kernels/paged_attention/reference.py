"""Pure-JAX decode paged attention: the ground truth the Pallas kernels are tested against.

One query token per sequence attends to the first `lengths[b]` tokens of its pages. Token i of
row b lives in page `page_tables[b, i // S_page]` at slot `i % S_page` (the layout of
`jinfer.cache.paged_kv_cache`). Query head n reads KV head n // G, G = N // K.

int8 pages come with float32 scales [K, P, S_page], one per (KV head, page slot): the key or
value there is `pages * scales[..., None]` (`jinfer.quant.kv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_span(lengths_B: jax.Array, sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
  """(first visible position, one past the last) per row.

  The query sits at position length - 1; a sliding window of W keeps the last W positions
  (itself included), so a window of 1 sees only the newest token.
  """
  if sliding_window is None:
    return jnp.zeros_like(lengths_B), lengths_B
  return jnp.maximum(lengths_B - sliding_window, 0), lengths_B


def apply_soft_cap(s: jax.Array, soft_cap: float | None) -> jax.Array:
  """Gemma-style logit capping, cap * tanh(s / cap), applied after scaling."""
  if soft_cap is None:
    return s
  return soft_cap * jnp.tanh(s / soft_cap)


def dot_f32(a_GxC: jax.Array, b: jax.Array, *, contract_b: int) -> jax.Array:
  """a @ b (b contracted on dim contract_b) accumulated in float32, as the kernels compute it.

  float32 inputs run at full precision: not one bf16 MXU pass on TPU, not TF32 on GPU.
  """
  precision = jax.lax.Precision.HIGHEST if a_GxC.dtype == jnp.float32 else None
  return jax.lax.dot_general(a_GxC, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def ref_paged_attention(q_BxNxH: jax.Array, k_pages_KxPxSxH: jax.Array,
                        v_pages_KxPxSxH: jax.Array, page_tables_BxM: jax.Array,
                        lengths_B: jax.Array, *, k_scales: jax.Array | None = None,
                        v_scales: jax.Array | None = None, scale: float | None = None,
                        soft_cap: float | None = None,
                        sliding_window: int | None = None) -> jax.Array:
  """Decode attention over paged K/V, softmax in float32; returns [B, N, H] in q's dtype.

  Slots past a row's length, outside its window, or behind a NO_PAGE (-1) entry are masked and
  zeroed before use, so NaN garbage there (pages or scales) cannot leak (not even as 0 * NaN).
  Rows with nothing visible (length 0) return zeros. With k_scales / v_scales [K, P, S_page]
  the int8 pages are dequantized after the gather.
  """
  b, n, h = q_BxNxH.shape
  kv_heads, num_pages, page_size, _ = k_pages_KxPxSxH.shape
  m = page_tables_BxM.shape[1]
  scale = h ** -0.5 if scale is None else scale
  lo_B, hi_B = visible_span(lengths_B.astype(jnp.int32), sliding_window)
  pos_T = jnp.arange(m * page_size, dtype=jnp.int32)
  visible_BxT = (pos_T[None] >= lo_B[:, None]) & (pos_T[None] < hi_B[:, None])
  table_BxM = jnp.clip(page_tables_BxM, 0, num_pages - 1)

  def gather(pages_KxPxSxH: jax.Array, scales_KxPxS: jax.Array | None) -> jax.Array:
    seq_BxKxTxH = pages_KxPxSxH[:, table_BxM].transpose(1, 0, 2, 3, 4).reshape(
        b, kv_heads, m * page_size, h).astype(jnp.float32)
    if scales_KxPxS is not None:
      seq_BxKxTxH = seq_BxKxTxH * scales_KxPxS[:, table_BxM].transpose(1, 0, 2, 3).reshape(
          b, kv_heads, m * page_size, 1)
    return jnp.where(visible_BxT[:, None, :, None], seq_BxKxTxH, 0.0)

  k_BxKxTxH = gather(k_pages_KxPxSxH, k_scales)
  v_BxKxTxH = gather(v_pages_KxPxSxH, v_scales)
  q_BxKxGxH = q_BxNxH.astype(jnp.float32).reshape(b, kv_heads, n // kv_heads, h)
  s_BxKxGxT = jnp.einsum("BKGH,BKTH->BKGT", q_BxKxGxH, k_BxKxTxH,
                         precision=jax.lax.Precision.HIGHEST) * scale
  s_BxKxGxT = apply_soft_cap(s_BxKxGxT, soft_cap)
  s_BxKxGxT = jnp.where(visible_BxT[:, None, None], s_BxKxGxT, -jnp.inf)
  max_BxKxGx1 = jnp.max(s_BxKxGxT, axis=-1, keepdims=True)
  max_BxKxGx1 = jnp.where(jnp.isfinite(max_BxKxGx1), max_BxKxGx1, 0.0)  # empty rows
  p_BxKxGxT = jnp.exp(s_BxKxGxT - max_BxKxGx1)
  sum_BxKxGx1 = jnp.sum(p_BxKxGxT, axis=-1, keepdims=True)
  o_BxKxGxH = jnp.einsum("BKGT,BKTH->BKGH", p_BxKxGxT, v_BxKxTxH,
                         precision=jax.lax.Precision.HIGHEST)
  o_BxKxGxH = jnp.where(sum_BxKxGx1 > 0, o_BxKxGxH / jnp.maximum(sum_BxKxGx1, 1e-30), 0.0)
  return o_BxKxGxH.reshape(b, n, h).astype(q_BxNxH.dtype)
