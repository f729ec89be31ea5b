"""Where each packed query sits, and the work items the kernels run over.

Packed layout (tpu-inference's ragged paged attention): the queries of S sequences lie back to
back in q [T, N, H]; sequence s owns rows [cu_q_lens[s], cu_q_lens[s + 1]), and its q_len =
cu_q_lens[s + 1] - cu_q_lens[s] queries are the newest of its kv_lens[s] cached tokens, so its
query i sits at position kv_lens[s] - q_len + i (its K/V already written). A decode step is a
sequence with q_len 1, a prefill chunk one with q_len > 1: one call mixes both. Rows past
cu_q_lens[S] (padding) belong to no sequence and come out as zeros.

The kernels run one work item per block of `queries_per_block` queries of one sequence: W =
cdiv(T, BQ) + S items bound every layout statically (each sequence wastes at most one partial
block); items past the last real block are idle (0 rows).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLayout(NamedTuple):
  """Per packed row: its sequence, its position, and whether it belongs to any sequence."""
  seq_T: jax.Array
  position_T: jax.Array
  valid_T: jax.Array


def token_layout(cu_q_lens_S1: jax.Array, kv_lens_S: jax.Array, num_tokens: int) -> TokenLayout:
  """The sequence and position of each of `num_tokens` packed rows (the reference's view)."""
  cu = cu_q_lens_S1.astype(jnp.int32)
  num_seqs = kv_lens_S.shape[0]
  t_T = jnp.arange(num_tokens, dtype=jnp.int32)
  seq_T = jnp.searchsorted(cu[1:], t_T, side="right").astype(jnp.int32)
  valid_T = (t_T >= cu[0]) & (seq_T < num_seqs)
  seq_T = jnp.minimum(seq_T, num_seqs - 1)
  q_len_T = cu[seq_T + 1] - cu[seq_T]
  position_T = kv_lens_S.astype(jnp.int32)[seq_T] - q_len_T + (t_T - cu[seq_T])
  return TokenLayout(seq_T, jnp.where(valid_T, position_T, 0), valid_T)


class WorkItems(NamedTuple):
  """Per work item w: its sequence, first packed row, rows in use (0: idle), the position of
  its first query, and the span [lo, hi) of key positions any of its queries sees."""
  seq_W: jax.Array
  q_start_W: jax.Array
  rows_W: jax.Array
  first_position_W: jax.Array
  lo_W: jax.Array
  hi_W: jax.Array


def num_work_items(num_tokens: int, num_seqs: int, queries_per_block: int) -> int:
  """The static bound on work items: sum_s cdiv(q_len_s, BQ) < cdiv(T, BQ) + S."""
  return -(-num_tokens // queries_per_block) + num_seqs


def work_items(cu_q_lens_S1: jax.Array, kv_lens_S: jax.Array, num_tokens: int,
               queries_per_block: int, sliding_window: int | None) -> WorkItems:
  """Splits every sequence's queries into blocks of `queries_per_block`, in packed order."""
  bq = queries_per_block
  cu = cu_q_lens_S1.astype(jnp.int32)
  kv_lens_S = kv_lens_S.astype(jnp.int32)
  num_seqs = kv_lens_S.shape[0]
  q_lens_S = cu[1:] - cu[:-1]
  blocks_S = (q_lens_S + bq - 1) // bq
  block_ends_S = jnp.cumsum(blocks_S)
  w_W = jnp.arange(num_work_items(num_tokens, num_seqs, bq), dtype=jnp.int32)
  seq_W = jnp.searchsorted(block_ends_S, w_W, side="right").astype(jnp.int32)
  busy_W = seq_W < num_seqs
  seq_W = jnp.minimum(seq_W, num_seqs - 1)
  block_W = w_W - (block_ends_S[seq_W] - blocks_S[seq_W])
  rows_W = jnp.where(busy_W, jnp.clip(q_lens_S[seq_W] - block_W * bq, 0, bq), 0)
  first_position_W = kv_lens_S[seq_W] - q_lens_S[seq_W] + block_W * bq
  hi_W = jnp.where(rows_W > 0, first_position_W + rows_W, 0)
  lo_W = jnp.zeros_like(hi_W)
  if sliding_window is not None:  # the first query's window reaches furthest back
    lo_W = jnp.where(rows_W > 0, jnp.maximum(first_position_W - sliding_window + 1, 0), 0)
  return WorkItems(seq_W=seq_W, q_start_W=cu[seq_W] + block_W * bq, rows_W=rows_W,
                   first_position_W=first_position_W, lo_W=lo_W, hi_W=hi_W)


def _block_rows(items: WorkItems, queries_per_block: int, num_tokens: int):
  """[W, BQ] packed row of each query slot of each item, and whether the slot is in use."""
  r_Q = jnp.arange(queries_per_block, dtype=jnp.int32)
  used_WxQ = r_Q[None, :] < items.rows_W[:, None]
  return jnp.where(used_WxQ, items.q_start_W[:, None] + r_Q[None, :], num_tokens), used_WxQ


def gather_query_blocks(q_TxNxH: jax.Array, items: WorkItems, queries_per_block: int,
                        kv_heads: int, padded_group: int) -> jax.Array:
  """[W, K, G' * BQ, H] query tiles: row g * BQ + r is query r of the item for head g of the KV
  head's group (group-major, so a row's query index is row % BQ); unused slots and the padded
  heads g >= G are zeros."""
  t, n, h = q_TxNxH.shape
  g = n // kv_heads
  rows_WxQ, used_WxQ = _block_rows(items, queries_per_block, t)
  q_WxQxNxH = jnp.where(used_WxQ[..., None, None], q_TxNxH[jnp.minimum(rows_WxQ, t - 1)], 0)
  w = rows_WxQ.shape[0]
  q_WxQxKxGxH = q_WxQxNxH.reshape(w, queries_per_block, kv_heads, g, h)
  q_WxQxKxGxH = jnp.pad(q_WxQxKxGxH, ((0, 0), (0, 0), (0, 0), (0, padded_group - g), (0, 0)))
  return q_WxQxKxGxH.transpose(0, 2, 3, 1, 4).reshape(
      w, kv_heads, padded_group * queries_per_block, h)


def scatter_query_blocks(out_WxKxRxH: jax.Array, items: WorkItems, queries_per_block: int,
                         num_tokens: int, num_heads: int) -> jax.Array:
  """The inverse of `gather_query_blocks`: [T, N, H], zeros for rows of no sequence."""
  w, kv_heads, _, h = out_WxKxRxH.shape
  g = num_heads // kv_heads
  out = out_WxKxRxH.reshape(w, kv_heads, -1, queries_per_block, h)[:, :, :g]
  out_WxQxNxH = out.transpose(0, 3, 1, 2, 4).reshape(w, queries_per_block, num_heads, h)
  rows_WxQ, _ = _block_rows(items, queries_per_block, num_tokens)
  out_TxNxH = jnp.zeros((num_tokens, num_heads, h), out_WxKxRxH.dtype)
  return out_TxNxH.at[rows_WxQ].set(out_WxQxNxH, mode="drop")  # unused slots: row T, dropped
