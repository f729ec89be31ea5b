"""Decode paged attention: Pallas kernels for TPU and GPU, and the XLA reference.

`paged_attention` picks an implementation; the backend-specific wrappers take tuning values.
Layout (jinfer.cache.paged_kv_cache): q [B, N, H], k/v pages [K, P, S_page, H], page_tables
[B, M] int32 (NO_PAGE = -1 unused), lengths [B]; query head n uses KV head n // (N // K).
An int8 cache passes int8 pages plus float32 k_scales / v_scales [K, P, S_page].
"""

from __future__ import annotations

import jax

from pallas_kernels import dispatch
from pallas_kernels.paged_attention import validation
from pallas_kernels.paged_attention.gpu import paged_attention_gpu
from pallas_kernels.paged_attention.reference import ref_paged_attention
from pallas_kernels.paged_attention.tpu import paged_attention_tpu

__all__ = ["paged_attention", "paged_attention_gpu", "paged_attention_tpu",
           "ref_paged_attention"]


def paged_attention(q, k_pages, v_pages, page_tables, lengths, *, backend: str = "auto",
                    interpret: bool | None = None, scale: float | None = None,
                    soft_cap: float | None = None, sliding_window: int | None = None,
                    k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                    **tuning) -> jax.Array:
  """Decode attention of q [B, N, H] over paged K/V -> [B, N, H].

  backend: "auto" uses the Pallas kernel of `jax.default_backend()` (tpu/gpu) and the XLA
  reference elsewhere (CPU, ignoring tuning); "tpu"/"gpu" force a kernel (on CPU pass
  interpret=True); "xla" is the reference.
  interpret: run the kernel in Pallas interpret mode (any platform, slow; None means False:
  a kernel never silently falls back to the interpreter).
  k_scales / v_scales: float32 [K, P, S_page] scales of int8 k_pages / v_pages (both or
  neither); the kernels scale logits and probabilities by them instead of dequantizing pages.
  tuning: backend keyword args (pages_per_block, num_splits, num_warps, num_stages).
  """
  choice = dispatch.choose(backend, interpret, tuning)
  common = {"scale": scale, "soft_cap": soft_cap, "sliding_window": sliding_window,
            "k_scales": k_scales, "v_scales": v_scales}
  if choice.backend == "xla":
    validation.check_inputs(q, k_pages, v_pages, page_tables, lengths, k_scales=k_scales,
                            v_scales=v_scales, soft_cap=soft_cap,
                            sliding_window=sliding_window)
    return ref_paged_attention(q, k_pages, v_pages, page_tables, lengths, **common)
  kernel = paged_attention_tpu if choice.backend == "tpu" else paged_attention_gpu
  return kernel(q, k_pages, v_pages, page_tables, lengths, interpret=choice.interpret, **common,
                **choice.tuning)
