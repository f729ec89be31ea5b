"""Ragged paged attention: prefill chunks and decode tokens of many sequences in one call.

The queries of S sequences are packed back to back in q [T, N, H]; sequence s owns rows
cu_q_lens[s]:cu_q_lens[s + 1], which are its newest tokens (positions kv_lens[s] - q_len ..
kv_lens[s] - 1, K/V already written), and attends causally over its page table row
page_tables[s] in the decode kernel's page layout ([K, P, S_page, H] pools,
`jinfer.cache.paged_kv_cache`). This is tpu-inference's ragged paged attention contract; the
engine's packed prefill is its caller. Pallas kernels for TPU and GPU, and the XLA reference.
"""

from __future__ import annotations

import inspect

import jax

from pallas_kernels import dispatch
from pallas_kernels.ragged_attention import validation
from pallas_kernels.ragged_attention.gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_attention.reference import ref_ragged_paged_attention
from pallas_kernels.ragged_attention.tpu import ragged_paged_attention_tpu

__all__ = ["ragged_paged_attention", "ragged_paged_attention_gpu", "ragged_paged_attention_tpu",
           "ref_ragged_paged_attention"]


def ragged_paged_attention(q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, *,
                           backend: str = "auto", interpret: bool | None = None,
                           scale: float | None = None, soft_cap: float | None = None,
                           sliding_window: int | None = None, k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None, **tuning) -> jax.Array:
  """Causal attention of packed queries q [T, N, H] over their sequences' pages -> [T, N, H].

  page_tables [S, M] int32, kv_lens [S], cu_q_lens [S + 1]; rows past cu_q_lens[S] belong to no
  sequence and come out as zeros. backend / interpret / scales as `paged_attention`'s: "auto"
  is the Pallas kernel of `jax.default_backend()` (tpu/gpu) and the XLA reference elsewhere.
  tuning: pages_per_block, queries_per_block (and num_warps, num_stages on GPU).
  """
  choice = dispatch.choose(backend, interpret, tuning)
  common = {"scale": scale, "soft_cap": soft_cap, "sliding_window": sliding_window,
            "k_scales": k_scales, "v_scales": v_scales}
  if choice.backend == "xla":
    validation.check_inputs(q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens,
                            k_scales=k_scales, v_scales=v_scales, soft_cap=soft_cap,
                            sliding_window=sliding_window)
    return ref_ragged_paged_attention(q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens,
                                      **common)
  kernel = ragged_paged_attention_tpu if choice.backend == "tpu" else ragged_paged_attention_gpu
  tuning = choice.tuning
  if choice.auto:  # tuning for the other platform's kernel (num_warps on TPU) does not apply
    accepted = inspect.signature(kernel).parameters
    tuning = {k: v for k, v in tuning.items() if k in accepted}
  return kernel(q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens,
                interpret=choice.interpret, **common, **tuning)
