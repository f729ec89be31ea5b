"""Int8 matmuls: Pallas kernels for TPU and GPU, and the XLA reference.

`int8_matmul` (weight-only, float32 accumulation) and `int8_matmul_w8a8` (activations quantized
per token, int32 accumulation) pick an implementation; the backend-specific wrappers take
tuning values. Layout (jinfer's): x [..., K] float32/bfloat16, w_q [N, K] int8 (out, in),
scales float32 [N] per output channel or [N, G] per group of K // G inputs; y [..., N] in x's
dtype, y = (x @ w_q.T) * scales with the scales applied after accumulating.
"""

from __future__ import annotations

import jax

from pallas_kernels import dispatch
from pallas_kernels.int8_matmul import validation
from pallas_kernels.int8_matmul.gpu import int8_matmul_gpu, int8_matmul_w8a8_gpu
from pallas_kernels.int8_matmul.reference import (
    quantize_per_token,
    ref_int8_matmul,
    ref_int8_matmul_w8a8,
)
from pallas_kernels.int8_matmul.tpu import int8_matmul_tpu, int8_matmul_w8a8_tpu

__all__ = ["int8_matmul", "int8_matmul_gpu", "int8_matmul_tpu", "int8_matmul_w8a8",
           "int8_matmul_w8a8_gpu", "int8_matmul_w8a8_tpu", "quantize_per_token",
           "ref_int8_matmul", "ref_int8_matmul_w8a8"]

_KERNELS = {(False, "tpu"): int8_matmul_tpu, (False, "gpu"): int8_matmul_gpu,
            (True, "tpu"): int8_matmul_w8a8_tpu, (True, "gpu"): int8_matmul_w8a8_gpu}


def _dispatch(x, w_q, scales, *, w8a8: bool, backend: str, interpret: bool | None,
              tuning: dict) -> jax.Array:
  """Shared backend semantics of the two public entry points (see `int8_matmul`)."""
  choice = dispatch.choose(backend, interpret, tuning)
  if choice.backend == "xla":
    validation.check_inputs(x, w_q, scales)
    ref = ref_int8_matmul_w8a8 if w8a8 else ref_int8_matmul
    return ref(x, w_q, scales)
  return _KERNELS[w8a8, choice.backend](x, w_q, scales, interpret=choice.interpret,
                                        **choice.tuning)


def int8_matmul(x, w_q, scales, *, backend: str = "auto", interpret: bool | None = None,
                **tuning) -> jax.Array:
  """Weight-only int8 matmul: x [..., K] @ w_q [N, K].T * scales -> [..., N] in x's dtype.

  backend: "auto" uses the Pallas kernel of `jax.default_backend()` (tpu/gpu) and the XLA
  reference elsewhere (CPU, ignoring tuning); "tpu"/"gpu" force a kernel (on CPU pass
  interpret=True); "xla" is the reference.
  interpret: run the kernel in Pallas interpret mode (any platform, slow; None means False:
  a kernel never silently falls back to the interpreter).
  tuning: backend keyword args (block_m, block_n, block_k; GPU also num_warps, num_stages).
  """
  return _dispatch(x, w_q, scales, w8a8=False, backend=backend, interpret=interpret,
                   tuning=tuning)


def int8_matmul_w8a8(x, w_q, scales, *, backend: str = "auto", interpret: bool | None = None,
                     **tuning) -> jax.Array:
  """W8A8 int8 matmul: x quantized per token (absmax / 127), int32 accumulation -> [..., N].

  Same backend, interpret and tuning semantics as `int8_matmul`.
  """
  return _dispatch(x, w_q, scales, w8a8=True, backend=backend, interpret=interpret,
                   tuning=tuning)
