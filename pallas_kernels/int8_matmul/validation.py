"""Input checks for the int8 matmuls: shapes, dtypes, block sizes and per-backend tiling rules.

Shapes vs blocks: M (tokens) is padded up to a multiple of block_m by the wrappers and sliced
back (x is small); N and K are never padded, since that would copy the whole weight every call:
block_n must divide N and block_k must divide K, and an error names the block sizes that work.
Default blocks (None) are chosen to satisfy these rules, falling back to the full dimension.

Interpret mode accepts any block that divides; compiled kernels also need hardware tiles, and a
bad one shows up as a cryptic Mosaic/Triton error, so those rules are checked here:
  TPU: block_n and block_k multiples of 128 or the full N / K (lanes; int8 weight rows need 32
    sublanes, which 128 covers); block_m a multiple of 8 rows for float32, 16 for bfloat16 and
    32 for int8 (W8A8) activations; per-group scales need group_size % 128 == 0 unless
    block_k == group_size.
  GPU (Triton): block_m, block_n, block_k and group_size powers of two >= 16 (tl.dot).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

ACTIVATION_DTYPES = (jnp.float32, jnp.bfloat16)


class Dims(NamedTuple):
  """The sizes every int8-matmul path needs."""
  m: int  # rows of x (tokens), leading dims flattened
  n: int  # output channels
  k: int  # input channels (contracted)
  groups: int | None  # scale groups along K; None for per-channel scales [N]

  @property
  def group_size(self) -> int:
    """Inputs per scale group (K when scales are per channel)."""
    return self.k if self.groups is None else self.k // self.groups

  @property
  def k_unit(self) -> int:
    """block_k must be a multiple of this: the group size, or 1 for per-channel scales."""
    return 1 if self.groups is None else self.group_size


def is_pow2(x: int) -> bool:
  """Whether x is a power of two (1 included)."""
  return x >= 1 and (x & (x - 1)) == 0


def check_inputs(x, w_q, scales) -> Dims:
  """Checks x [..., K], w_q [N, K] int8 and scales [N] or [N, G] agree; returns the sizes."""
  if x.ndim < 1:
    raise ValueError(f"x must be [..., K] with K the input features; got a scalar {x.shape}.")
  if x.dtype not in ACTIVATION_DTYPES:
    raise ValueError(
        f"x must be float32 or bfloat16; got {x.dtype}. Cast it, e.g. x.astype(jnp.bfloat16).")
  if w_q.ndim != 2 or w_q.dtype != jnp.int8:
    raise ValueError(
        f"w_q must be a 2-D int8 [N, K] (out, in) weight; got {w_q.dtype} {w_q.shape}. "
        f"Quantize the weight to int8 with float32 scales first.")
  n, k = w_q.shape
  if x.shape[-1] != k:
    hint = " (w_q looks transposed: jinfer weights are [out, in])" if n == x.shape[-1] else ""
    raise ValueError(
        f"K mismatch: x has K={x.shape[-1]} input features but w_q [N, K] is {w_q.shape}{hint}.")
  if scales.dtype != jnp.float32:
    raise ValueError(f"scales must be float32; got {scales.dtype}. Use scales.astype(jnp.float32).")
  if scales.ndim not in (1, 2) or scales.shape[0] != n:
    raise ValueError(
        f"scales must be [N={n}] (per output channel) or [N={n}, G] (per group of K // G "
        f"inputs); got shape {scales.shape}.")
  groups = scales.shape[1] if scales.ndim == 2 else None
  if groups is not None and (groups < 1 or k % groups):
    raise ValueError(
        f"scales [N, G] needs G dividing K={k} (group_size = K // G); got G={groups}.")
  return Dims(m=math.prod(x.shape[:-1]), n=n, k=k, groups=groups)


def divisors(dim: int) -> list[int]:
  """All divisors of dim, ascending."""
  small = [d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0]
  return sorted(set(small + [dim // d for d in small]))


def pick_block(dim: int, target: int, ok: Callable[[int], bool]) -> int:
  """The largest divisor of dim <= target that satisfies ok, else the smallest above target.

  Returns target itself when no divisor fits, so the checks below report the problem.
  """
  fits = [d for d in divisors(dim) if ok(d)]
  below = [d for d in fits if d <= target]
  if below:
    return max(below)
  return min(fits) if fits else target


def _suggest(dim: int, ok: Callable[[int], bool]) -> str:
  fits = [d for d in divisors(dim) if ok(d)]
  return ", ".join(map(str, fits[-6:])) if fits else "none: pad the weight"


def check_blocks(dims: Dims, block_m: int, block_n: int, block_k: int, *,
                 ok_n: Callable[[int], bool] = lambda d: True,
                 ok_k: Callable[[int], bool] = lambda d: True) -> None:
  """Blocks are positive, block_n | N, block_k | K and block_k a multiple of group_size.

  ok_n / ok_k: the backend's tiling rule, used only to suggest sizes that will also compile.
  """
  for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    if value < 1:
      raise ValueError(f"{name} must be at least 1; got {value}.")
  if dims.n % block_n:
    raise ValueError(
        f"block_n={block_n} must divide N={dims.n} (weights are not padded); use one of: "
        f"{_suggest(dims.n, ok_n)}.")
  gs = dims.k_unit
  ok_k_group = lambda d: ok_k(d) and d % gs == 0
  if dims.k % block_k or block_k % gs:
    group = "" if dims.groups is None else f" and be a multiple of group_size={gs}"
    raise ValueError(
        f"block_k={block_k} must divide K={dims.k}{group} (weights are not padded); use one "
        f"of: {_suggest(dims.k, ok_k_group)}.")


def tpu_rows(dtype) -> int:
  """Sublane tile rows for dtype: 8 per 32 bits (16 for bfloat16, 32 for int8)."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def tpu_lane_ok(full: int) -> Callable[[int], bool]:
  """A check that a block size is a multiple of 128 lanes or the whole dimension `full`."""
  return lambda d: d % 128 == 0 or d == full


def check_tpu_tiling(dims: Dims, block_m: int, block_n: int, block_k: int, x_dtype) -> None:
  """Mosaic TPU tiles for the compiled kernel (see the module docstring)."""
  rows = tpu_rows(x_dtype)
  if block_m % rows:
    raise ValueError(
        f"TPU: block_m={block_m} must be a multiple of {rows} for {jnp.dtype(x_dtype).name} "
        f"activations (sublane tiling); use block_m={max(rows, block_m // rows * rows)}.")
  for name, value, full in (("block_n", block_n, dims.n), ("block_k", block_k, dims.k)):
    if not tpu_lane_ok(full)(value):
      raise ValueError(
          f"TPU: {name}={value} must be a multiple of 128 or the full dimension {full} "
          f"(lane tiling); use one of: {_suggest(full, tpu_lane_ok(full))}, or interpret=True.")
  gs = dims.group_size
  if dims.groups is not None and block_k != gs and gs % 128:
    raise ValueError(
        f"TPU: group_size={gs} is not a multiple of 128, so each block must be one group: "
        f"pass block_k={gs} (itself a multiple of 128 or all of K={dims.k}).")


def gpu_ok(d: int) -> bool:
  """Triton block sizes: powers of two, and at least 16 for tl.dot."""
  return is_pow2(d) and d >= 16


def check_gpu_tiling(dims: Dims, block_m: int, block_n: int, block_k: int) -> None:
  """Triton tiles for the compiled kernel (see the module docstring)."""
  for name, value, full in (("block_m", block_m, None), ("block_n", block_n, dims.n),
                            ("block_k", block_k, dims.k)):
    if not gpu_ok(value):
      fix = "16, 32, 64, ..." if full is None else _suggest(full, gpu_ok)
      raise ValueError(
          f"GPU: {name}={value} must be a power of two >= 16 (Triton blocks, tl.dot); use one "
          f"of: {fix}.")
  if dims.groups is not None and not gpu_ok(dims.group_size):
    raise ValueError(
        f"GPU: group_size={dims.group_size} must be a power of two >= 16 (each group is one "
        f"tl.dot); regroup the scales or use interpret=True.")
