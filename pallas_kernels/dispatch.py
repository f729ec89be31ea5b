"""How every kernel package picks an implementation for a call: "auto" is the Pallas kernel of
`jax.default_backend()` on TPU/GPU and the XLA reference elsewhere; "tpu"/"gpu" force a kernel
(off its platform only in interpret mode); "xla" is the reference."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

BACKENDS = ("auto", "tpu", "gpu", "xla")


class Choice(NamedTuple):
  """The implementation a call runs: backend "tpu", "gpu" or "xla", interpret mode (False, True
  or a pltpu.InterpretParams), the kernel's tuning arguments, and whether "auto" chose it."""
  backend: str
  interpret: Any
  tuning: dict
  auto: bool


def choose(backend: str, interpret: Any, tuning: dict) -> Choice:
  """Checks the request and resolves "auto"; under "auto" the reference ignores tuning, so one
  call runs on every platform."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
  platform = jax.default_backend()
  auto = backend == "auto"
  if auto:
    backend = platform if platform in ("tpu", "gpu") else "xla"
  if backend == "xla":
    if tuning and not auto:
      raise ValueError(f"backend='xla' takes no tuning arguments; got {sorted(tuning)}.")
    return Choice("xla", False, {}, auto)
  interpret = False if interpret is None else interpret  # (keeps pltpu.InterpretParams)
  if platform != backend and not interpret:
    raise ValueError(
        f"backend={backend!r} kernel cannot compile on platform {platform!r}; pass "
        f"interpret=True to run it in Pallas interpret mode, or use backend='xla'.")
  return Choice(backend, interpret, tuning, auto)
