"""The elementwise ops between a decoder layer's matmuls, and `MatmulFusion`, which hands them to a
matmul kernel: RMSNorm before the q/k/v and gate/up projections, SwiGLU before the down
projection, the residual add after the output and down projections.

A decode step on CPU would otherwise run a dozen small XLA ops per layer between its native
matmul kernels (each about a microsecond to launch, a tenth of a batch-1 step on SmolLM2);
with them fused, a layer is five kernel calls and nothing else. Where no kernel applies, or
activations are not float32, `MatmulFusion.apply` runs the same ops in XLA around the matmul.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 (as transformers does), returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def swiglu(gate_up_Bx___xF2: jax.Array) -> jax.Array:
  """silu(gate) * up of interleaved (gate, up) pairs [..., 2F] -> [..., F] (`pack_layer`'s
  w_gate_up layout)."""
  gate_up = gate_up_Bx___xF2.reshape(*gate_up_Bx___xF2.shape[:-1], -1, 2)
  return jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]


@dataclasses.dataclass(frozen=True)
class MatmulFusion:
  """What a matmul y = x @ W.T also does: its input is `swiglu(x)` when `swiglu`, then
  `rms_norm(., norm_weight, norm_eps)` when `norm_weight` is given; its output adds `residual`
  (shaped like y) when given. Built at trace time; the arrays are the traced values."""

  norm_weight: Optional[jax.Array] = None  # [K]
  norm_eps: float = 0.0
  swiglu: bool = False
  residual: Optional[jax.Array] = None  # [..., N], y's shape

  @property
  def empty(self) -> bool:
    """Whether it fuses nothing."""
    return not self.swiglu and self.norm_weight is None and self.residual is None

  def input(self, x: jax.Array) -> jax.Array:
    """The matmul's input from x, in XLA."""
    if self.swiglu:
      x = swiglu(x)
    if self.norm_weight is not None:
      x = rms_norm(x, self.norm_weight, self.norm_eps)
    return x

  def output(self, y: jax.Array) -> jax.Array:
    """The result from the matmul's output y, in XLA."""
    return y if self.residual is None else self.residual + y.astype(self.residual.dtype)

  def apply(self, x: jax.Array, matmul: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """`output(matmul(input(x)))`: the fused computation in XLA around `matmul`."""
    return self.output(matmul(self.input(x)))
