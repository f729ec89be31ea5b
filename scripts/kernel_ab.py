"""Two builds of the CPU kernels timed against each other in one process (an A/B test).

These machines are shared: the same kernel measures 10-30% apart from one run to the next, more
than most kernel changes gain. Here both builds load side by side (their FFI targets under the
suffixes _a and _b) and time the same decode-shaped matmul stack in alternating rounds, so
both see the same machine load; the ratio B / A per round is what to read, with its spread.

  python scripts/kernel_ab.py --b=/tmp/kernels_variant.cc                # B against main's
  python scripts/kernel_ab.py --a=old.cc --b=new.cc --formats=int4 --rows=1,8 --rounds=21

The stack is SmolLM2-135M's decoder matmuls (30 layers of q/k/v, o, gate/up and down: 3.5 M
weights a layer) in one jitted program, plus its int8 LM head with --head.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cpu_kernels import build
from jinfer.quant import weights as quant

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K): qkv, o, gate_up, down
LAYERS = 30
HEAD_SHAPE = (49152, 576)
TARGET = {"float32": "jinfer_matmul_f32", "bf16": "jinfer_matmul_bf16",
          "int8": "jinfer_matmul_int8", "int4": "jinfer_matmul_int4"}


def kernel_operands(w_NxK: jax.Array, fmt: str) -> tuple[str, tuple]:
  """The FFI target and weight operands of `w` stored as `fmt`."""
  if fmt == "float32":
    return TARGET[fmt], (w_NxK,)
  if fmt == "bf16":
    return TARGET[fmt], (w_NxK.astype(jnp.bfloat16),)
  q = quant.quantize(w_NxK, fmt)
  if fmt == "int8":
    return TARGET[fmt], (q.codes, q.scales)
  return TARGET[fmt], (q.codes, q.scales.astype(jnp.float16), q.offsets.astype(jnp.float16))


def matmul(target: str, x_MxK: jax.Array, weights: tuple, n: int) -> jax.Array:
  none = jnp.zeros((0,), jnp.float32)
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32))(
      x_MxK, *weights, none, none, norm_eps=np.float32(1e-5), swiglu=False)


def stack(fmt: str, head: bool, hot: bool, seed: int = 0) -> tuple[list, int]:
  """[(target, weights, N)] for every matmul of the stack, and the bytes a pass reads. hot: every
  layer the same weights, which then stay in cache (the kernels' compute-bound speed; the GB/s
  printed then count the bytes multiplied, not read from memory)."""
  key = jax.random.PRNGKey(seed)
  layers, nbytes = [], 0
  shapes = list(LAYER_SHAPES) * LAYERS + ([HEAD_SHAPE] if head else [])
  for i, (n, k) in enumerate(shapes):
    if hot and i >= len(LAYER_SHAPES) and (n, k) != HEAD_SHAPE:
      layers.append(layers[i % len(LAYER_SHAPES)])
    else:
      key, sub = jax.random.split(key)
      w = jax.random.normal(sub, (n, k), jnp.float32) / np.sqrt(k)  # activations stay O(1)
      target, weights = kernel_operands(w, "int8" if (n, k) == HEAD_SHAPE else fmt)
      layers.append((target, weights, n))
    nbytes += sum(a.nbytes for a in layers[-1][1])
  return layers, nbytes


def program(layers: list, suffix: str):
  """One pass over the stack through the targets + suffix: the first K columns of each output
  feed the next matmul."""
  targets = [t + suffix for t, _, _ in layers]
  sizes = [n for _, _, n in layers]

  @jax.jit
  def run(x_MxK, weights):
    for target, w, n in zip(targets, weights, sizes):
      k = w[0].shape[1] * (2 if target == TARGET["int4"] + suffix else 1)
      x_MxK = matmul(target, x_MxK[:, :k], w, n)
    return x_MxK

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--a", type=Path, default=build.SOURCE,
                      help="kernels.cc of build A (default: jinfer's)")
  parser.add_argument("--b", type=Path, required=True, help="kernels.cc of build B")
  parser.add_argument("--formats", default="float32,int8,int4")
  parser.add_argument("--rows", default="1,8", help="x rows (batch sizes), comma-separated")
  parser.add_argument("--rounds", type=int, default=15, help="alternating A, B rounds")
  parser.add_argument("--reps", type=int, default=10, help="passes per round")
  parser.add_argument("--head", action="store_true", help="add the int8 LM head")
  parser.add_argument("--hot", action="store_true",
                      help="the same weights in every layer: in cache, compute-bound")
  args = parser.parse_args()
  for suffix, source in (("_a", args.a), ("_b", args.b)):
    build.register(build.compiled_library(source.resolve()), suffix)
  print(f"A = {args.a}\nB = {args.b}")
  print(f"{'format':>8} {'rows':>4} {'A ms':>7} {'B ms':>7} {'A GB/s':>7} {'B GB/s':>7} "
        f"{'B/A time: median [min, max]':>30}")
  for fmt in args.formats.split(","):
    layers, nbytes = stack(fmt, args.head, args.hot)
    weights = [w for _, w, _ in layers]
    for rows in map(int, args.rows.split(",")):
      x = jax.random.normal(jax.random.PRNGKey(1), (rows, LAYER_SHAPES[0][1]), jnp.float32)
      runs = {s: program(layers, s) for s in ("_a", "_b")}
      diff = float(jnp.max(jnp.abs(runs["_a"](x, weights) - runs["_b"](x, weights))))
      times = {"_a": [], "_b": []}
      for i in range(args.rounds):
        for s in (("_a", "_b") if i % 2 == 0 else ("_b", "_a")):
          time.sleep(0.01)  # the other build's helper threads stop spinning
          start = time.perf_counter()
          for _ in range(args.reps):
            y = runs[s](x, weights)
          y.block_until_ready()
          times[s].append((time.perf_counter() - start) / args.reps)
      ratios = [b / a for a, b in zip(times["_a"], times["_b"])]
      a, b = statistics.median(times["_a"]), statistics.median(times["_b"])
      print(f"{fmt:>8} {rows:>4} {a * 1e3:7.2f} {b * 1e3:7.2f} {nbytes / a / 1e9:7.1f} "
            f"{nbytes / b / 1e9:7.1f}   {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}, {max(ratios):.3f}]  max|A-B| {diff:.2e}", flush=True)


if __name__ == "__main__":
  main()
