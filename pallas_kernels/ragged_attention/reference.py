"""Pure-JAX ragged paged attention: the ground truth the Pallas kernels are tested against.

A query at position p attends causally to positions <= p of its sequence's pages, which is decode
attention over a length of p + 1. So each packed query becomes its own decode row (its
sequence's page table, length position + 1) of `ref_paged_attention`. That reads every
sequence's pages once per query: simple and obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import ref_paged_attention
from pallas_kernels.ragged_attention.schedule import token_layout


def ref_ragged_paged_attention(q_TxNxH: jax.Array, k_pages_KxPxSxH: jax.Array,
                               v_pages_KxPxSxH: jax.Array, page_tables_SxM: jax.Array,
                               kv_lens_S: jax.Array, cu_q_lens_S1: jax.Array, *,
                               k_scales: jax.Array | None = None,
                               v_scales: jax.Array | None = None, scale: float | None = None,
                               soft_cap: float | None = None,
                               sliding_window: int | None = None) -> jax.Array:
  """Causal attention of packed queries [T, N, H] over their sequences' pages -> [T, N, H].

  Rows that belong to no sequence return zeros. Masks, scales, soft cap and window are
  `ref_paged_attention`'s.
  """
  layout = token_layout(cu_q_lens_S1, kv_lens_S, q_TxNxH.shape[0])
  lengths_T = jnp.where(layout.valid_T, layout.position_T + 1, 0)
  return ref_paged_attention(q_TxNxH, k_pages_KxPxSxH, v_pages_KxPxSxH,
                             page_tables_SxM[layout.seq_T], lengths_T, k_scales=k_scales,
                             v_scales=v_scales, scale=scale, soft_cap=soft_cap,
                             sliding_window=sliding_window)
