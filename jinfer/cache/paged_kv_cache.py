"""Paged KV cache: a shared pool of fixed-size pages plus a page table per sequence.

Sequences grow, share and free their KV memory page by page (`page_allocator.PageAllocator` does
the host-side bookkeeping); the device holds the pool and, per batch row, a page table and a
length. Token i of row b lives in page `page_tables[b, i // S_page]` at slot `i % S_page`.

Layout of each layer's pool: k_pages / v_pages [K, P, S_page, H] (KV heads, pages, tokens in a
page, head dim), the layout of JAX's Pallas paged attention kernels
(`jax.experimental.pallas.ops.tpu.paged_attention` and `.gpu.paged_attention` both take
k_pages [num_kv_heads, total_num_pages, page_size, head_dim]), so the kernel can take our pool
as it is. Why this order:
- One (head, page) block is a contiguous [S_page, H] tile, the unit a kernel fetches per grid
  step. On TPU its last two dims map onto (sublanes, lanes) of a vreg/VMEM tile: S_page a
  multiple of 8 (16 for bfloat16) and H a multiple of 128 tile natively with no relayout.
  H = 64 (SmolLM2) fills half the lanes: the compiled kernel needs it padded to 128 (or two
  heads packed per tile); interpret mode and the XLA path below accept any H.
- On GPU, consecutive threads of a warp read consecutive elements of one H-vector, and the
  S_page vectors of a page follow each other, so a page is read with fully coalesced,
  sequential transactions (vLLM's CUDA kernel gets the same effect with
  [num_blocks, K, H/x, block, x] keys; its FlashAttention backend uses [P, S_page, K, H]).
- KV heads outermost: sharding KV heads over devices (tensor parallelism) slices the leading
  dim, so each device's shard is itself a contiguous [K/d, P, S_page, H] pool and page ids mean
  the same on every device. The page-major alternative ([P, S_page, K, H], vLLM flash and JAX's
  ragged_paged_attention, which also interleaves K and V) makes one page of all heads one DMA,
  which helps when K is tiny; the per-head tile above is what the decode kernels here are
  written against.

int8 pools (dtype=jnp.int8, `jinfer.quant.kv`): k_pages / v_pages hold int8 codes and
k_scales / v_scales [K, P, S_page] float32 hold one scale per (KV head, page, slot), i.e. per
cached token and head. Why this layout:
- Same leading (K, P) as the pages: sharding KV heads slices both alike, a page id indexes both,
  and `copy_pages` is one gather for each.
- The kernels use a block's scales as a [1, T] row: T is the minor (lane) axis of the [G, T]
  logits and probabilities they scale, so the row broadcasts over the G query heads with no
  transpose. JAX's TPU kernel keeps scales as [K, P, S_page, 1] and broadcasts them to H before
  the call: tokens on sublanes, and a float32 scale pool 4x the int8 pages.
- GPU: a page's scales are S_page contiguous floats, one coalesced read beside the page.
- TPU: Mosaic wants a block's last two dims to be multiples of (8, 128) or the array's full
  dims; one page's (1, S_page) row of [K, P, S_page] breaks that on the page dim, so the TPU
  wrapper hands the kernel a [K, P, 1, S_page] view. That is free on GPU/CPU; on TPU XLA may
  relayout it, copying the scale pool (4 / H of the int8 pages' bytes) per call. HBM tiles
  also pad S_page to 128 lanes (4x at the int8 minimum S_page = 32). Neither is measured yet.
Memory per token and head: H + 4 bytes against 2H for bfloat16 (0.52x at H = 128).

`write`, `keys_values` and `attend` mirror `KVCache`, so `llama.forward` drives either cache
unchanged. `keys_values` gathers each row's pages into a contiguous [B, K, S, H] view: the
pure-XLA path. With the static `attention_impl="pallas"`, `attend` runs one-token (decode)
queries through the Pallas paged-attention kernel instead, which reads the pages in place
(compiled on TPU/GPU, interpret mode on CPU); multi-token queries (prefill) use the gather path.
With "xla" on CPU, one-token rows over float pools run RoPE, the write and attention as one
native kernel (`write_and_attend`, `cpu_kernels.paged_decode_rope_attention`), which also reads
pages in place. A view whose
one-token rows are packed prefill chunks (`packed_query_starts`, set by the engine) goes through
the ragged paged-attention kernel with "pallas" (`pallas_kernels.ragged_attention`).
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jinfer import cpu_kernels
from jinfer.cache.page_allocator import NO_PAGE
from jinfer.models.attention import attention
from jinfer.models.config import LlamaConfig
from jinfer.models.rope import Rope
from jinfer.quant.kv import dequantize_kv, is_int8, quantize_kv

IntArray = Union[jax.Array, np.ndarray, Sequence[int]]
GATHER_ROWS = 64  # one-token rows the gather path attends at a time
ATTENTION_IMPLS = ("xla", "pallas")


@flax.struct.dataclass
class PagedKVCache:
  """Per-layer page pools, the page table and length of every batch row.

  `lengths[b]` is one past the highest position row b has written (write advances it; the host
  may set it with `with_page_tables`). Slots at or past it, and page-table entries equal to
  NO_PAGE, are never read: `keys_values` returns zeros there, so stale or uninitialised pages
  (or scales) cannot leak into attention even as 0 * NaN.
  """

  k_pages: tuple[jax.Array, ...]  # per layer: [K, P, S_page, H]
  v_pages: tuple[jax.Array, ...]  # per layer: [K, P, S_page, H]
  page_tables: jax.Array  # [B, max_pages_per_seq] int32 page ids, NO_PAGE where unused
  lengths: jax.Array  # [B] int32 tokens cached per row
  # int8 pools only, per layer [K, P, S_page] float32; empty tuples otherwise (no pytree leaves).
  k_scales: tuple[jax.Array, ...] = ()
  v_scales: tuple[jax.Array, ...] = ()
  # "xla" (gather + XLA attention) or "pallas" (paged-attention kernels). Static: part of the
  # tree structure, so jit specializes on it.
  attention_impl: str = flax.struct.field(pytree_node=False, default="xla")
  # Only on a view whose B rows are one-token queries of S sequences packed back to back (the
  # engine's prefill): sequence s owns rows [starts[s], starts[s + 1]), [S + 1] int32. With
  # "pallas", `attend` then runs them through the ragged kernel, which reads a sequence's pages
  # once per block of its queries instead of once per query.
  packed_query_starts: jax.Array | None = None

  @classmethod
  def init(cls, config: LlamaConfig, num_pages: int, page_size: int, batch: int,
           max_pages_per_seq: int, dtype=jnp.float32,
           attention_impl: str = "xla") -> "PagedKVCache":
    """A zeroed pool of `num_pages` pages of `page_size` tokens; every row empty (no pages).

    dtype jnp.int8 stores int8 K/V with one float32 scale per (token, KV head).
    """
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}; got {attention_impl!r}.")
    if num_pages < 1 or page_size < 1 or max_pages_per_seq < 1:
      raise ValueError(
          f"num_pages ({num_pages}), page_size ({page_size}) and max_pages_per_seq "
          f"({max_pages_per_seq}) must all be at least 1.")
    shape = (config.n_kv_heads, num_pages, page_size, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    scales = ()
    if is_int8(dtype):
      scales = tuple(jnp.ones(shape[:3], jnp.float32) for _ in range(config.n_layers))
    return cls(k_pages=zeros, v_pages=zeros, k_scales=scales, v_scales=scales,
               page_tables=jnp.full((batch, max_pages_per_seq), NO_PAGE, jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32), attention_impl=attention_impl)

  @property
  def num_pages(self) -> int:
    """P: pages in each layer's pool."""
    return self.k_pages[0].shape[1]

  @property
  def page_size(self) -> int:
    """Tokens per page."""
    return self.k_pages[0].shape[2]

  @property
  def quantized(self) -> bool:
    """Whether the pools hold int8 codes plus scales."""
    return bool(self.k_scales)

  @property
  def decode_reads_pages_in_place(self) -> bool:
    """Whether one-token attention reads each row's pages where they lie, up to the row's
    position (a kernel), so that its cost does not grow with the page-table width; the gather
    path copies the whole table's pages first."""
    if self.attention_impl == "pallas":
      return True
    return (not self.quantized
            and cpu_kernels.has_paged_decode_rope_attention(self.k_pages[0].dtype))

  @property
  def max_pages_per_seq(self) -> int:
    """M: the width of the page table [B, M]."""
    return self.page_tables.shape[1]

  @property
  def max_len(self) -> int:
    """Positions a row can address: S of the `keys_values` view."""
    return self.max_pages_per_seq * self.page_size

  def with_page_tables(self, page_tables: IntArray, lengths: IntArray) -> "PagedKVCache":
    """The same pool with new page tables [B, max_pages_per_seq] and lengths [B] (from the host)."""
    page_tables = jnp.asarray(page_tables, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if page_tables.ndim != 2 or lengths.shape != page_tables.shape[:1]:
      raise ValueError(
          f"page_tables must be [B, max_pages_per_seq] and lengths [B]; got "
          f"{page_tables.shape} and {lengths.shape}. Pad short tables with NO_PAGE "
          f"(page_allocator.page_table_array does).")
    # New rows: any packing the old rows had no longer describes them.
    return self.replace(page_tables=page_tables, lengths=lengths, packed_query_starts=None)

  def write_and_attend(self, layer: int, qkv_BxTxKxG2xH: jax.Array, rope: Rope,
                       positions_BxT: jax.Array) -> tuple[jax.Array, "PagedKVCache"]:
    """RoPE on the projection's queries and keys, `write`, then `attend`: ([B, T, N, H], cache).

    One-token rows over float pools with attention_impl "xla" run as one CPU kernel
    (`cpu_kernels.paged_decode_rope_attention`: no RoPE, scatter or gather ops per layer, and
    the pages written in place).
    """
    def unfused():
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = rope.split_qkv(qkv_BxTxKxG2xH)
      cache = self.write(layer, k_BxTxKxH, v_BxTxKxH, positions_BxT)
      return cache.attend(layer, q_BxTxNxH, positions_BxT), cache

    if (qkv_BxTxKxG2xH.shape[1] != 1 or self.quantized or self.attention_impl == "pallas"):
      return unfused()

    def fallback():
      out_BxTxNxH, cache = unfused()
      return out_BxTxNxH[:, 0], cache.k_pages[layer], cache.v_pages[layer]

    out_BxNxH, k_pages, v_pages = cpu_kernels.paged_decode_rope_attention(
        qkv_BxTxKxG2xH[:, 0], rope.cos_BxTxHh[:, 0], rope.sin_BxTxHh[:, 0], self.k_pages[layer],
        self.v_pages[layer], self.page_tables, positions_BxT[:, 0], fallback=fallback)
    return out_BxNxH[:, None], self._advance(positions_BxT).replace(
        k_pages=_replace_at(self.k_pages, layer, k_pages),
        v_pages=_replace_at(self.v_pages, layer, v_pages))

  def write(self, layer: int, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
            positions_BxT: jax.Array) -> "PagedKVCache":
    """Stores new keys/values of `layer` in their rows' pages and advances `lengths`.

    A position outside [0, max_len) or in a page-table entry holding NO_PAGE is dropped (so
    padding tokens may use any out-of-range position). Rows must not write to a page another row
    holds: make it private first (`PageAllocator.writable` + `copy_pages`). An int8 pool
    quantizes them first (one scale per token and KV head).
    """
    page_BxT, slot_BxT, valid_BxT = self._locate(positions_BxT)
    # Dropped writes go to page id P, out of bounds, which mode="drop" skips.
    page_BxT = jnp.where(valid_BxT, page_BxT, self.num_pages)
    heads_first = lambda x: jnp.moveaxis(x, 2, 0)  # [B, T, K, (H)] -> [K, B, T, (H)]
    # Adjacent advanced indices: the update is indexed [K, B, T, (H)].
    put = lambda pool, update: pool.at[:, page_BxT, slot_BxT].set(
        heads_first(update).astype(pool.dtype), mode="drop")
    cache = self._advance(positions_BxT)
    if not self.quantized:
      return cache.replace(
          k_pages=_replace_at(self.k_pages, layer, put(self.k_pages[layer], k_BxTxKxH)),
          v_pages=_replace_at(self.v_pages, layer, put(self.v_pages[layer], v_BxTxKxH)))
    (k_q, k_scale_BxTxK), (v_q, v_scale_BxTxK) = quantize_kv(k_BxTxKxH), quantize_kv(v_BxTxKxH)
    return cache.replace(
        k_pages=_replace_at(self.k_pages, layer, put(self.k_pages[layer], k_q)),
        v_pages=_replace_at(self.v_pages, layer, put(self.v_pages[layer], v_q)),
        k_scales=_replace_at(self.k_scales, layer, put(self.k_scales[layer], k_scale_BxTxK)),
        v_scales=_replace_at(self.v_scales, layer, put(self.v_scales[layer], v_scale_BxTxK)))

  def keys_values(self, layer: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (k [B,K,S,H], v [B,K,S,H], key positions [S]), S = max_len, gathered from pages.

    Slots past a row's length or without a page read as zeros (the causal mask hides them).
    An int8 pool is dequantized to float32.
    """
    b, m = self.page_tables.shape
    has_page_BxM = (self.page_tables >= 0) & (self.page_tables < self.num_pages)
    table_BxM = jnp.where(has_page_BxM, self.page_tables, 0)
    positions_S = jnp.arange(self.max_len, dtype=jnp.int32)
    readable_BxS = (jnp.repeat(has_page_BxM, self.page_size, axis=1)
                    & (positions_S[None, :] < self.lengths[:, None]))

    def gather(pages_KxPxSpx___: jax.Array) -> jax.Array:
      """[K, P, S_page, (H)] pool -> [B, K, S, (H)] rows; works for pages and scales."""
      kv_heads, _, page_size, *h = pages_KxPxSpx___.shape
      pages_KxBxMxSpx___ = pages_KxPxSpx___[:, table_BxM]
      return jnp.moveaxis(pages_KxBxMxSpx___, 1, 0).reshape(b, kv_heads, m * page_size, *h)

    def read(pages, scales) -> jax.Array:
      seq_BxKxSxH = gather(pages)
      if self.quantized:
        seq_BxKxSxH = dequantize_kv(seq_BxKxSxH, gather(scales))
      # After dequantizing: a NaN scale in an unreadable slot becomes 0 here.
      return jnp.where(readable_BxS[:, None, :, None], seq_BxKxSxH, 0)

    scales = lambda s: s[layer] if self.quantized else None
    return (read(self.k_pages[layer], scales(self.k_scales)),
            read(self.v_pages[layer], scales(self.v_scales)), positions_S)

  def attend(self, layer: int, q_BxTxNxH: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """Causal attention [B, T, N, H] of queries at `positions` over this layer's pages.

    Call after `write`ing the queries' own keys. One query per row with attention_impl="pallas"
    runs the paged-attention kernel over positions 0..position (the query is the newest token),
    or the ragged kernel when the rows are packed sequences (`packed_query_starts`); anything
    else gathers the pages (`keys_values`) and masks by position.
    """
    if (q_BxTxNxH.shape[1] == 1 and self.attention_impl == "pallas"
        and self.packed_query_starts is not None):
      return self._ragged_attend(layer, q_BxTxNxH[:, 0], positions_BxT[:, 0])[:, None]
    if q_BxTxNxH.shape[1] == 1 and self.attention_impl == "pallas":
      from pallas_kernels.paged_attention import paged_attention  # pylint: disable=g-import-not-at-top
      backend, interpret = _kernel_backend()
      scales = {}
      if self.quantized:  # int8 pages: the kernel scales logits and probabilities in place
        scales = {"k_scales": self.k_scales[layer], "v_scales": self.v_scales[layer]}
      out_BxNxH = paged_attention(
          q_BxTxNxH[:, 0], self.k_pages[layer], self.v_pages[layer], self.page_tables,
          positions_BxT[:, 0] + 1, backend=backend, interpret=interpret, **scales)
      return out_BxNxH[:, None]
    return self._gather_attend(layer, q_BxTxNxH, positions_BxT)

  def _ragged_attend(self, layer: int, q_TxNxH: jax.Array, positions_T: jax.Array) -> jax.Array:
    """The packed rows' attention through the ragged paged-attention kernel: a sequence's page
    table is its first row's, and its cached length one past its last row's position."""
    from pallas_kernels.ragged_attention import ragged_paged_attention  # pylint: disable=g-import-not-at-top
    backend, interpret = _kernel_backend()
    starts_S1 = self.packed_query_starts
    last_row = q_TxNxH.shape[0] - 1
    first_S, last_S = (jnp.clip(starts_S1[:-1], 0, last_row),
                       jnp.clip(starts_S1[1:] - 1, 0, last_row))
    kv_lens_S = jnp.where(starts_S1[1:] > starts_S1[:-1], positions_T[last_S] + 1, 0)
    scales = {}
    if self.quantized:
      scales = {"k_scales": self.k_scales[layer], "v_scales": self.v_scales[layer]}
    return ragged_paged_attention(
        q_TxNxH, self.k_pages[layer], self.v_pages[layer], self.page_tables[first_S],
        kv_lens_S, starts_S1, backend=backend, interpret=interpret, **scales)

  def _gather_attend(self, layer: int, q_BxTxNxH: jax.Array, positions_BxT: jax.Array):
    b, t = q_BxTxNxH.shape[:2]
    if t == 1 and b > GATHER_ROWS and b % GATHER_ROWS == 0:
      # Many one-token rows (an engine's packed prefill): a block of rows at a time, so that
      # the gathered copies stay GATHER_ROWS rows of the table, not one per token.
      blocks = lambda x: x.reshape(b // GATHER_ROWS, GATHER_ROWS, *x.shape[1:])
      attend_block = lambda args: self.with_page_tables(*args[2:])._gather_attend(
          layer, args[0], args[1])
      out = jax.lax.map(attend_block, (blocks(q_BxTxNxH), blocks(positions_BxT),
                                       blocks(self.page_tables), blocks(self.lengths)))
      return out.reshape(q_BxTxNxH.shape)
    k_BxKxSxH, v_BxKxSxH, k_positions_S = self.keys_values(layer)
    out_BxTxNxH = attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, positions_BxT,
                            k_positions_S[None, :])
    # Dequantized K/V are float32: keep a bfloat16 model's activations bfloat16.
    return out_BxTxNxH.astype(q_BxTxNxH.dtype) if self.quantized else out_BxTxNxH

  def copy_pages(self, src: IntArray, dst: IntArray) -> "PagedKVCache":
    """Copies whole pages src[i] -> dst[i] in every layer's K and V, and their scales if int8."""
    src_C = jnp.asarray(src, jnp.int32).reshape(-1)
    dst_C = jnp.asarray(dst, jnp.int32).reshape(-1)
    if src_C.shape != dst_C.shape:
      raise ValueError(f"copy_pages needs as many sources as destinations; got "
                       f"{src_C.shape[0]} and {dst_C.shape[0]}.")
    copy = lambda pages: pages.at[:, dst_C].set(pages[:, src_C])
    return self.replace(k_pages=tuple(map(copy, self.k_pages)),
                        v_pages=tuple(map(copy, self.v_pages)),
                        k_scales=tuple(map(copy, self.k_scales)),
                        v_scales=tuple(map(copy, self.v_scales)))

  def _advance(self, positions_BxT: jax.Array) -> "PagedKVCache":
    """This cache with each row's length past the last position it writes."""
    _, _, valid_BxT = self._locate(positions_BxT)
    written_B = jnp.max(jnp.where(valid_BxT, positions_BxT + 1, 0), axis=1)
    return self.replace(lengths=jnp.maximum(self.lengths, written_B.astype(jnp.int32)))

  def _locate(self, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(page id, slot in page, writable?) of each position of each row."""
    in_range_BxT = (positions_BxT >= 0) & (positions_BxT < self.max_len)
    safe_BxT = jnp.where(in_range_BxT, positions_BxT, 0)
    rows_Bx1 = jnp.arange(self.page_tables.shape[0])[:, None]
    page_BxT = self.page_tables[rows_Bx1, safe_BxT // self.page_size]
    valid_BxT = in_range_BxT & (page_BxT >= 0) & (page_BxT < self.num_pages)
    return page_BxT, safe_BxT % self.page_size, valid_BxT


def _kernel_backend() -> tuple[str, bool]:
  """(backend, interpret) for paged_attention: the platform kernel; on CPU the TPU one, interpreted.

  Interpret mode is slow and meant for tests: it runs only because attention_impl="pallas" asked
  for the kernel (load_model's "auto" picks "xla" on CPU).
  """
  platform = jax.default_backend()
  if platform in ("tpu", "gpu"):
    return platform, False
  return "tpu", True


def _replace_at(items: tuple, index: int, value) -> tuple:
  return items[:index] + (value,) + items[index + 1:]
