"""The engine's device side: slot state over one long-lived paged KV pool, and the pure jitted
programs the host drives, after JetStream's engine API:

- `prefill`: writes a pack of prompt chunks (of several sequences) into their pages, returns the
  hidden state after each chunk's last token (chunked prefill: long prompts go in several calls);
- `insert`: starts a slot from a finished prefill (samples its first token);
- `restore`: restarts a preempted sequence in a slot with the tokens it had generated;
- `generate`: `num_steps` decode steps of the running slots (gathered into a row bucket) in one
  on-device loop;
- `sync`: the host's page tables and stop flags for every slot (freeing a slot is giving it an
  empty table and stopping it).

Every slot keeps its own progress (`loop.DecodeState` has no batch-wide step), so slots are
filled and emptied while the others run. Shapes depend only on the engine's settings (slots,
pool, row and page-table width buckets, pack buckets), so nothing compiles after warm-up.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from jinfer import sharding
from jinfer.cache.page_allocator import NO_PAGE
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.decoding import loop
from jinfer.decoding.programs import decode_step_fn
from jinfer.decoding.sampling import SamplingArrays
from jinfer.models import llama


@flax.struct.dataclass
class EngineState:
  """B slots: their decode rows (with the shared page pool as `decode.cache`) and settings."""

  decode: loop.DecodeState
  sampling: SamplingArrays

  @property
  def cache(self) -> PagedKVCache:
    """The shared paged KV cache of every slot."""
    return self.decode.cache


def _with_cache(state: EngineState, cache: PagedKVCache) -> EngineState:
  return state.replace(decode=state.decode.replace(cache=cache))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def prefill(params, state: EngineState, tokens_T: jax.Array, slots_T: jax.Array,
            positions_T: jax.Array, chunk_starts_S1: jax.Array, *,
            config) -> tuple[jax.Array, EngineState]:
  """Writes a pack of prompt chunks into their slots' pages: chunk s is the tokens
  [chunk_starts_S1[s], chunk_starts_S1[s + 1]) (unused chunks are empty, and tokens past the
  last chunk are padding); token t belongs to slot `slots_T[t]` at position `positions_T[t]`
  (padding: a slot past the last, written nowhere). Returns the final hidden states [S, D] after
  each chunk's last token, and the state with every packed slot's length advanced to its chunk's
  end.

  Each token is its own attention row over its slot's pages (ragged paged attention): a chunk
  sees its sequence's earlier chunks and itself, causally, and nothing of the other chunks. So
  several sequences share one call, and only the pack is padded to a bucket, not each chunk.
  With attention_impl="pallas" the rows go through the ragged kernel as the S chunks they form."""
  cache = state.cache
  num_slots = cache.page_tables.shape[0]
  packed_T = slots_T < num_slots
  tables_TxM = jnp.where(packed_T[:, None], cache.page_tables[jnp.where(packed_T, slots_T, 0)],
                         NO_PAGE)
  view = cache.with_page_tables(tables_TxM, jnp.zeros_like(slots_T)).replace(
      packed_query_starts=chunk_starts_S1)
  h_Tx1xD, view = llama.hidden_states(params, config, tokens_T[:, None], positions_T[:, None],
                                      view)
  # A chunk's slot holds positions up to the chunk's end (a reused slot forgets its old length).
  lengths = cache.lengths.at[slots_T].set(0, mode="drop").at[slots_T].max(positions_T + 1,
                                                                         mode="drop")
  cache = view.with_page_tables(cache.page_tables, lengths)
  ends_S = jnp.maximum(chunk_starts_S1[1:] - 1, 0)
  return h_Tx1xD[ends_S, 0], sharding.host_readable(_with_cache(state, cache))


def _put_row(state: EngineState, slot, row: loop.DecodeState,
             sampling_row: SamplingArrays) -> EngineState:
  put = lambda full, one: full.at[slot].set(one[0])
  decode = jax.tree.map(put, state.decode.replace(cache=None), row.replace(cache=None))
  return EngineState(decode=decode.replace(cache=state.cache),
                     sampling=jax.tree.map(put, state.sampling, sampling_row))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def insert(params, state: EngineState, slot: jax.Array, h_SxD: jax.Array, index: jax.Array,
           prompt_len: jax.Array, prompt_mask_V: jax.Array, sampling_row: SamplingArrays, *,
           config):
  """Starts `slot` after its prompt's prefill: samples the first token from the logits of the
  hidden state `h_SxD[index]` (`prefill`'s) with the slot's settings (`sampling_row`, one row).
  Returns (state, token, its logprob, top ids, top logprobs) of that first token."""
  capacity, num_top = state.decode.top_ids_BxLxN.shape[1:]
  logits_V = llama.logits_from_hidden(params, config, h_SxD[index][None, None])[0, 0]
  row = loop.init_state(None, prompt_len[None], prompt_mask_V[None], capacity, num_top,
                        logits_V[None], sampling_row, jnp.zeros((1,), bool))
  return (sharding.host_readable(_put_row(state, slot, row, sampling_row)),
          row.tokens_BxL[0, 0], row.logprobs_BxL[0, 0],
          row.top_ids_BxLxN[0, 0], row.top_logprobs_BxLxN[0, 0])


@functools.partial(jax.jit, donate_argnames=("state",))
def restore(state: EngineState, slot: jax.Array, prompt_len: jax.Array, prompt_mask_V: jax.Array,
            tokens_L: jax.Array, num_generated: jax.Array, output_counts_V: jax.Array,
            sampling_row: SamplingArrays) -> EngineState:
  """Restarts a preempted sequence in `slot` after its prompt and all but its last generated
  token were prefilled again: decode goes on from its last token with the same draws (a row's
  samples depend on its seed and generated count only)."""
  capacity, num_top = state.decode.top_ids_BxLxN.shape[1:]
  empty = loop.empty_state(None, 1, prompt_mask_V.shape[0], capacity, num_top)
  row = empty.replace(tokens_BxL=tokens_L[None], num_generated_B=num_generated[None],
                      done_B=jnp.zeros((1,), bool), prompt_lens_B=prompt_len[None],
                      prompt_mask_BxV=prompt_mask_V[None], output_counts_BxV=output_counts_V[None])
  return sharding.host_readable(_put_row(state, slot, row, sampling_row))


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "table_width"),
                   donate_argnames=("state",))
def generate(params, state: EngineState, rows_R: jax.Array, *, config, num_steps: int,
             table_width: int):
  """`num_steps` decode steps of the slots `rows_R` (distinct; finished and empty slots among
  them change nothing), gathered into a batch of R rows: a step costs R rows, not every slot.

  Attention reads the first `table_width` entries of each page table (a bucket covering every
  running slot), not the whole table. Returns the state and the `num_steps` columns of each of
  the R slots from where it stood: tokens [R, k], logprobs [R, k], top ids and top logprobs
  [R, k, N] (read only the columns below the slot's new `num_generated_B`)."""
  cache = state.cache
  take = lambda x: x[rows_R]
  rows = jax.tree.map(take, state.decode.replace(cache=None))
  # Slots not decoding see no pages: a finished row re-writes its last position each step,
  # which must not land in pages a prefilling sequence now holds in that slot.
  tables_RxM = jnp.where(rows.done_B[:, None], NO_PAGE, cache.page_tables[rows_R, :table_width])
  view = cache.with_page_tables(tables_RxM, cache.lengths[rows_R])
  before_R = rows.num_generated_B
  rows = loop.decode(decode_step_fn(params, config), rows.replace(cache=view),
                     jax.tree.map(take, state.sampling), jnp.int32(num_steps))
  cache = rows.cache.with_page_tables(cache.page_tables,
                                      cache.lengths.at[rows_R].set(rows.cache.lengths))
  put = lambda full, part: full.at[rows_R].set(part)
  decode = jax.tree.map(put, state.decode.replace(cache=None), rows.replace(cache=None))
  columns_RxK = jnp.minimum(before_R[:, None] + jnp.arange(num_steps),
                            rows.tokens_BxL.shape[1] - 1)
  window = lambda x: jnp.take_along_axis(
      x, columns_RxK.reshape(columns_RxK.shape + (1,) * (x.ndim - 2)), axis=1)
  state = sharding.host_readable(state.replace(decode=decode.replace(cache=cache)))
  return (state, window(rows.tokens_BxL), window(rows.logprobs_BxL), window(rows.top_ids_BxLxN),
          window(rows.top_logprobs_BxLxN))


@functools.partial(jax.jit, donate_argnames=("state",))
def sync(state: EngineState, page_tables_BxM: jax.Array, stop_B: jax.Array) -> EngineState:
  """The host's page tables, and slots it stops (a stop string, an abort, a freed slot)."""
  cache = state.cache.with_page_tables(page_tables_BxM, state.cache.lengths)
  decode = state.decode.replace(cache=cache, done_B=state.decode.done_B | stop_B)
  return sharding.host_readable(state.replace(decode=decode))
