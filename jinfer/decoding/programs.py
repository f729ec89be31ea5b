"""The compiled programs of `generate`: prefill (contiguous or paged cache), one decode chunk,
and the ahead-of-time compile cache that holds them per shape bucket.

Shapes are bucketed (batch, prompt length and generated-token capacity rounded up to powers of
two) so a handful of compiled programs serve every request; per-row settings are traced arrays.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jinfer.cache.kv_cache import KVCache
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.decoding import loop
from jinfer.decoding.results import GenerationStats
from jinfer import sharding
from jinfer.models import llama


def prefill_logits(params, config, tokens_BxT: jax.Array, prompt_lens_B: jax.Array,
                   cache_len: int, cache_dtype=None) -> tuple[jax.Array, KVCache]:
  """Runs the padded prompts once; returns each prompt's last-position logits [B, V] and cache.

  The cache is `cache_dtype` (static under jit; int8 quantizes it), by default the params'.
  """
  dtype = params["final_norm"].dtype if cache_dtype is None else cache_dtype
  cache = KVCache.init(config, tokens_BxT.shape[0], cache_len, dtype)
  return prompt_logits(params, config, tokens_BxT, prompt_lens_B, cache)


def prompt_logits(params, config, tokens_BxT, prompt_lens_B, cache):
  """Writes the padded prompts into `cache`; returns last-position logits [B, V] and the cache."""
  batch, length = tokens_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  h_BxTxD, cache = llama.hidden_states(params, config, tokens_BxT, positions_BxT, cache)
  last_Bx1xD = jnp.take_along_axis(h_BxTxD, (prompt_lens_B - 1)[:, None, None], axis=1)
  return llama.logits_from_hidden(params, config, last_Bx1xD)[:, 0], cache


def decode_step_fn(params, config) -> loop.TokensToLogits:
  """The model as decode loops see it: one new token per row, through the cache."""
  def tokens_to_logits(tokens_B, positions_B, cache):
    logits, cache = llama.forward(params, config, tokens_B[:, None], positions_B[:, None], cache)
    return logits[:, 0], cache

  return tokens_to_logits


def prefill(params, tokens_PxT, prompt_lens_P, row_prompt_B, sampling, done_B, *, config,
             cache_len, cache_dtype, capacity, num_top_logprobs):
  """Runs the P distinct prompts once, then gives each of the B rows its prompt's cache."""
  logits_PxV, cache = prefill_logits(params, config, tokens_PxT, prompt_lens_P, cache_len,
                                     cache_dtype)
  cache = jax.tree.map(lambda x: x[row_prompt_B], cache)
  return sharding.host_readable(init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B,
                                          logits_PxV, cache, sampling, done_B, capacity,
                                          num_top_logprobs))


def prefill_paged(params, tokens_PxT, prompt_lens_P, row_prompt_B, sampling, done_B,
                   prompt_tables_PxM, tables_BxM, copy_src_C, copy_dst_C, *, config, num_pages,
                   page_size, cache_dtype, capacity, num_top_logprobs):
  """`prefill` into a paged cache (attention_impl="pallas") whose rows share prompt pages.

  Prompt p writes the pages of `prompt_tables_PxM[p]` once; then pages copy_src_C[i] are copied
  to copy_dst_C[i] (the partial last prompt page of rows that need their own), and the rows
  take their tables `tables_BxM` (see `_page_plan`).
  """
  cache = PagedKVCache.init(config, num_pages, page_size, tokens_PxT.shape[0],
                            tables_BxM.shape[1], cache_dtype, attention_impl="pallas")
  cache = cache.with_page_tables(prompt_tables_PxM, jnp.zeros_like(prompt_lens_P))
  logits_PxV, cache = prompt_logits(params, config, tokens_PxT, prompt_lens_P, cache)
  cache = cache.copy_pages(copy_src_C, copy_dst_C)
  cache = cache.with_page_tables(tables_BxM, prompt_lens_P[row_prompt_B])
  return sharding.host_readable(init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B,
                                          logits_PxV, cache, sampling, done_B, capacity,
                                          num_top_logprobs))


def init_rows(config, tokens_PxT, prompt_lens_P, row_prompt_B, logits_PxV, cache_B, sampling,
               done_B, capacity, num_top_logprobs):
  """The decode state of the B rows, each starting from its prompt's logits and cache rows."""
  num_prompts, length = tokens_PxT.shape
  in_prompt_PxT = jnp.arange(length) < prompt_lens_P[:, None]
  prompt_mask_PxV = jnp.zeros((num_prompts, config.vocab_size), bool).at[
      jnp.arange(num_prompts)[:, None], jnp.where(in_prompt_PxT, tokens_PxT, config.vocab_size)
  ].set(True, mode="drop")
  return loop.init_state(cache_B, prompt_lens_P[row_prompt_B], prompt_mask_PxV[row_prompt_B],
                         capacity, num_top_logprobs, logits_PxV[row_prompt_B], sampling, done_B)


def decode_chunk(params, state, sampling, num_steps, *, config):
  """Up to `num_steps` decode steps of every row (see `loop.decode`)."""
  return sharding.host_readable(
      loop.decode(decode_step_fn(params, config), state, sampling, num_steps))


PREFILL = jax.jit(prefill, static_argnames=("config", "cache_len", "cache_dtype", "capacity",
                                              "num_top_logprobs"))
PREFILL_PAGED = jax.jit(prefill_paged, static_argnames=(
    "config", "num_pages", "page_size", "cache_dtype", "capacity", "num_top_logprobs"))
DECODE = jax.jit(decode_chunk, static_argnames=("config",), donate_argnames=("state",))


class CompileCache:
  """Ahead-of-time compiled programs keyed by their static settings and input shapes."""

  def __init__(self):
    self._programs = {}

  @property
  def num_compiled(self) -> int:
    """How many programs were compiled."""
    return len(self._programs)

  def clear(self) -> None:
    """Drops every executable (they compile again when next needed)."""
    self._programs.clear()

  def get(self, jitted, args, static: dict, stats: GenerationStats, mesh=None):
    """The executable for these arguments; `mesh`: traced sharded over it (a model's mesh)."""
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), args)
    key = (id(jitted), tuple(sorted(static.items())), str(jax.tree.structure(args)), str(shapes),
           mesh)
    if key not in self._programs:
      start = time.perf_counter()
      with sharding.use(mesh):
        self._programs[key] = jitted.lower(*args, **static).compile()
      stats.compile_s += time.perf_counter() - start
    return self._programs[key]

  def run(self, jitted, args, static: dict, stats: GenerationStats, mesh=None):
    """Compiles if needed, then runs; returns (outputs, seconds the run took)."""
    program = self.get(jitted, args, static, stats, mesh)
    start = time.perf_counter()
    out = jax.block_until_ready(program(*args))
    return out, time.perf_counter() - start


COMPILED = CompileCache()
