r"""Decode-shape timings of the int8 matmul kernels next to a bfloat16 matmul.

  python -m pallas_kernels.int8_matmul.benchmark --m_sizes=1,8,64 --shapes=smollm2,llama8b

For each M (tokens) and weight [N, K] it times, on the current device, the weight-only int8
kernel, the W8A8 kernel and `x @ w_bf16.T`, all with bfloat16 activations, and prints
microseconds, weight GB/s (weight bytes read / time: decode is bound by reading the weight)
and the int8/bf16 time ratio (below 1: int8 is faster). Each figure is the median of `--runs`
timed calls after a warm-up (compile) call, each call ended by jax.block_until_ready.

On CPU the kernels cannot compile (and interpret mode would time the interpreter, not the
kernel), so there the XLA reference paths are timed instead and a note says so.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_w8a8
from pallas_kernels.paged_attention.benchmark import peak_gbps_for

SHAPE_SETS = {  # (N, K) = (out, in) weights at decode
    "smollm2": ((960, 576), (3072, 576), (576, 1536)),  # qkv-ish, gate/up, down of SmolLM2-135M
    "llama8b": ((4096, 4096), (28672, 4096)),  # attention out, fused gate/up of Llama-3-8B
}
M_SIZES = (1, 8, 64)
QUICK = {"m_sizes": (1, 8), "shapes": SHAPE_SETS["smollm2"], "runs": 3}


@dataclasses.dataclass
class Row:
  """One (M, N, K) point: median microseconds and weight GB/s of each path."""
  m: int
  n: int
  k: int
  us: dict[str, float]  # path -> median microseconds
  gbps: dict[str, float]  # path -> weight bytes / time

  @property
  def int8_over_bf16(self) -> float:
    """Time of the int8 kernel over the bfloat16 matmul's."""
    return self.us["int8"] / self.us["bf16"]


def time_call(fn: Callable, *args, runs: int) -> float:
  """Median seconds of `runs` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_operands(m: int, n: int, k: int, seed: int = 0):
  """(x bf16 [M, K], w_q int8 [N, K], scales f32 [N], w bf16 [N, K]) on the default device."""
  rng = np.random.default_rng(seed)
  w_q = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
  scales = jnp.asarray(rng.uniform(1e-3, 1e-2, n), jnp.float32)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  return x, w_q, scales, (w_q.astype(jnp.float32) * scales[:, None]).astype(jnp.bfloat16)


def bench_point(m: int, n: int, k: int, *, backend: str, runs: int) -> Row:
  """Times the three paths at one shape; the whole call is jitted so validation is traced once."""
  x, w_q, scales, w_bf16 = make_operands(m, n, k)
  paths = {
      "int8": (jax.jit(lambda x, w, s: int8_matmul(x, w, s, backend=backend)), (x, w_q, scales)),
      "w8a8": (jax.jit(lambda x, w, s: int8_matmul_w8a8(x, w, s, backend=backend)),
               (x, w_q, scales)),
      "bf16": (jax.jit(lambda x, w: x @ w.T), (x, w_bf16)),
  }
  weight_bytes = {"int8": n * k + 4 * n, "w8a8": n * k + 4 * n, "bf16": 2 * n * k}
  us, gbps = {}, {}
  for name, (fn, args) in paths.items():
    seconds = time_call(fn, *args, runs=runs)
    us[name], gbps[name] = seconds * 1e6, weight_bytes[name] / seconds / 1e9
  return Row(m=m, n=n, k=k, us=us, gbps=gbps)


def format_table(rows: Sequence[Row], peak_gbps: float | None = None) -> str:
  """A markdown table, one row per (M, N, K); with `peak_gbps`, the int8 kernel's weight
  bandwidth as a fraction of that peak."""
  header = ("| M | N | K | int8 us | int8 GB/s | w8a8 us | w8a8 GB/s | bf16 us | bf16 GB/s "
            "| int8/bf16 time |" + (" int8 / peak |" if peak_gbps else ""))
  lines = [header, "|" + " --- |" * (11 if peak_gbps else 10)]
  for r in rows:
    lines.append(
        f"| {r.m} | {r.n} | {r.k} | {r.us['int8']:.1f} | {r.gbps['int8']:.1f} "
        f"| {r.us['w8a8']:.1f} | {r.gbps['w8a8']:.1f} | {r.us['bf16']:.1f} "
        f"| {r.gbps['bf16']:.1f} | {r.int8_over_bf16:.2f} |"
        + (f" {r.gbps['int8'] / peak_gbps:.0%} |" if peak_gbps else ""))
  return "\n".join(lines)


def run(m_sizes: Sequence[int] = M_SIZES,
        shapes: Sequence[tuple[int, int]] = SHAPE_SETS["smollm2"] + SHAPE_SETS["llama8b"], *,
        runs: int = 10, backend: str = "auto", quick: bool = False,
        log: Callable[[str], None] = print) -> list[Row]:
  """Measures every (M, shape) point and logs the device, a note and the table.

  quick: 2 M sizes, the SmolLM2 shapes and 3 runs (a few seconds on CPU).
  """
  if quick:
    m_sizes, shapes, runs = QUICK["m_sizes"], QUICK["shapes"], QUICK["runs"]
  platform = jax.default_backend()
  log(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
  if backend == "auto" and platform not in ("tpu", "gpu"):
    log("note: Pallas kernels need a TPU or GPU; on this platform the int8 and w8a8 columns "
        "time the XLA reference paths.")
  rows = [bench_point(m, n, k, backend=backend, runs=runs) for n, k in shapes for m in m_sizes]
  peak = peak_gbps_for(jax.devices()[0].device_kind)
  if peak:
    log(f"peak memory bandwidth of this device kind: {peak:.0f} GB/s")
  log(format_table(rows, peak))
  return rows


def parse_shapes(names: Sequence[str]) -> list[tuple[int, int]]:
  """Shape-set names (smollm2, llama8b) and/or explicit NxK entries -> [(N, K), ...]."""
  shapes = []
  for name in names:
    if name in SHAPE_SETS:
      shapes += SHAPE_SETS[name]
    elif "x" in name:
      n, k = name.split("x")
      shapes.append((int(n), int(k)))
    else:
      raise ValueError(f"--shapes entries are {sorted(SHAPE_SETS)} or NxK like 4096x4096; "
                       f"got {name!r}.")
  return shapes


def main(argv: Sequence[str]) -> None:
  """Times the kernels at the flags' M sizes and shapes and prints the table."""
  del argv
  from absl import flags
  f = flags.FLAGS
  run([int(m) for m in f.m_sizes], parse_shapes(f.shapes), runs=f.runs, backend=f.backend,
      quick=f.quick)


if __name__ == "__main__":
  # Flags are defined only when run as a script, so importing this module (tests, notebooks)
  # never clashes with other absl entry points in the same process.
  from absl import app, flags
  flags.DEFINE_list("m_sizes", [str(m) for m in M_SIZES], "Rows of x (decode batch sizes).")
  flags.DEFINE_list("shapes", ["smollm2", "llama8b"], "Weight shape sets or NxK entries.")
  flags.DEFINE_integer("runs", 10, "Timed calls per point; the median is reported.")
  flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "gpu", "xla"],
                    "int8 paths: auto (kernel on TPU/GPU, XLA elsewhere) or forced.")
  flags.DEFINE_bool("quick", False, "M in 1, 8, SmolLM2 shapes, 3 runs (overrides the others).")
  app.run(main)
