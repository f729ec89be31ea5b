"""The engine's device side: slot state over one long-lived paged KV pool, and the pure jitted
programs the host drives, after JetStream's engine API:

- `prefill_chunk`: writes a chunk of one sequence's tokens into its pages, returns the logits
  after its last token (chunked prefill: long prompts go in several calls);
- `insert`: starts a slot from a finished prefill (samples its first token);
- `restore`: restarts a preempted sequence in a slot with the tokens it had generated;
- `generate`: `num_steps` decode steps of every slot in one on-device loop;
- `sync`: the host's page tables and stop flags for every slot (freeing a slot is giving it an
  empty table and stopping it).

Every slot keeps its own progress (`loop.DecodeState` has no batch-wide step), so slots are
filled and emptied while the others run. Shapes depend only on the engine's settings (slots,
pool, page-table width buckets, chunk buckets), so nothing compiles after warm-up.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

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
    return self.decode.cache


def _with_cache(state: EngineState, cache: PagedKVCache) -> EngineState:
  return state.replace(decode=state.decode.replace(cache=cache))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def prefill_chunk(params, state: EngineState, tokens_C: jax.Array, start: jax.Array,
                  num_valid: jax.Array, slot: jax.Array, *, config) -> tuple[jax.Array, EngineState]:
  """Writes tokens_C[:num_valid] at positions start.. of `slot`'s pages; returns the logits [V]
  after the last of them. Padding tokens write at positions the slot does not own yet or past
  its table (dropped), or at future positions that decode overwrites before reading."""
  cache = state.cache
  view = cache.with_page_tables(cache.page_tables[slot][None], start[None])
  positions_1xC = (start + jnp.arange(tokens_C.shape[0], dtype=jnp.int32))[None]
  h_1xCxD, view = llama.hidden_states(params, config, tokens_C[None], positions_1xC, view)
  last_1x1xD = jax.lax.dynamic_slice_in_dim(h_1xCxD, num_valid - 1, 1, axis=1)
  logits_V = llama.logits_from_hidden(params, config, last_1x1xD)[0, 0].astype(jnp.float32)
  cache = view.with_page_tables(cache.page_tables, cache.lengths.at[slot].set(start + num_valid))
  return logits_V, _with_cache(state, cache)


def _put_row(state: EngineState, slot, row: loop.DecodeState,
             sampling_row: SamplingArrays) -> EngineState:
  put = lambda full, one: full.at[slot].set(one[0])
  decode = jax.tree.map(put, state.decode.replace(cache=None), row.replace(cache=None))
  return EngineState(decode=decode.replace(cache=state.cache),
                     sampling=jax.tree.map(put, state.sampling, sampling_row))


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state: EngineState, slot: jax.Array, logits_V: jax.Array, prompt_len: jax.Array,
           prompt_mask_V: jax.Array, sampling_row: SamplingArrays):
  """Starts `slot` after its prompt's prefill: samples the first token from `logits_V` with the
  slot's settings (`sampling_row`, one row). Returns (state, token, its logprob, top ids, top
  logprobs) of that first token."""
  capacity, num_top = state.decode.top_ids_BxLxN.shape[1:]
  row = loop.init_state(None, prompt_len[None], prompt_mask_V[None], capacity, num_top,
                        logits_V[None], sampling_row, jnp.zeros((1,), bool))
  return (_put_row(state, slot, row, sampling_row), row.tokens_BxL[0, 0], row.logprobs_BxL[0, 0],
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
  return _put_row(state, slot, row, sampling_row)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "table_width"),
                   donate_argnames=("state",))
def generate(params, state: EngineState, *, config, num_steps: int, table_width: int):
  """`num_steps` decode steps of every running slot (finished and empty slots change nothing).

  Attention reads the first `table_width` entries of each page table (a bucket covering every
  running slot), not the whole table. Returns the state and the `num_steps` columns of every
  slot from where it stood: tokens [B, k], logprobs [B, k], top ids and top logprobs [B, k, N]
  (read only the columns below the new `num_generated_B`)."""
  cache = state.cache
  # Slots not decoding see no pages: a finished row re-writes its last position each step,
  # which must not land in pages a prefilling sequence now holds in that slot.
  tables_BxM = jnp.where(state.decode.done_B[:, None], NO_PAGE,
                         cache.page_tables[:, :table_width])
  view = cache.with_page_tables(tables_BxM, cache.lengths)
  before_B = state.decode.num_generated_B
  decode = loop.decode(decode_step_fn(params, config), state.decode.replace(cache=view),
                       state.sampling, jnp.int32(num_steps))
  cache = decode.cache.with_page_tables(cache.page_tables, decode.cache.lengths)
  columns_BxK = jnp.minimum(before_B[:, None] + jnp.arange(num_steps),
                            decode.tokens_BxL.shape[1] - 1)
  window = lambda x: jnp.take_along_axis(
      x, columns_BxK.reshape(columns_BxK.shape + (1,) * (x.ndim - 2)), axis=1)
  return (state.replace(decode=decode.replace(cache=cache)), window(decode.tokens_BxL), window(decode.logprobs_BxL),
          window(decode.top_ids_BxLxN), window(decode.top_logprobs_BxLxN))


@functools.partial(jax.jit, donate_argnames=("state",))
def sync(state: EngineState, page_tables_BxM: jax.Array, stop_B: jax.Array) -> EngineState:
  """The host's page tables, and slots it stops (a stop string, an abort, a freed slot)."""
  cache = state.cache.with_page_tables(page_tables_BxM, state.cache.lengths)
  decode = state.decode.replace(cache=cache, done_B=state.decode.done_B | stop_B)
  return state.replace(decode=decode)
