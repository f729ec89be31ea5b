"""The mesh-shape sweep: greedy decode tok/s of the same model on each (data, model) mesh, at
each batch size. Here the devices are fake CPU devices (`config.cpu_devices`, which splits this
machine's cores, so it measures overheads, not speedups); on a TPU VM set cpu_devices=0 and the
meshes run over the real chips. Weights are float32 whatever config.dtype says (the benchmark's
mesh rows are)."""

from __future__ import annotations

import jax

from experiments import common
from jinfer.benchmark import BenchConfig, bench_meshes, measured_read_gbps


def meshes(config) -> list[tuple[int, int]]:
  """`config.meshes` entries "DxM" as (data, model) sizes."""
  shapes = []
  for text in config.meshes:
    data, sep, tp = text.partition("x")
    if not (sep and data.isdigit() and tp.isdigit() and int(data) > 0 and int(tp) > 0):
      raise ValueError(f"config.meshes: {text!r} is not DATAxMODEL, e.g. '2x4'.")
    shapes.append((int(data), int(tp)))
  return shapes


def num_points(config) -> int:
  """Checks the config's fields and counts the points the run measures."""
  return len(meshes(config)) * len(config.batch_sizes)


def run(config, model, progress) -> tuple[common.Results, common.Figures]:
  """Measures every point (calling progress(1) after each); returns (results, figures)."""
  devices = len(jax.devices())
  shapes = meshes(config)
  too_big = [f"{d}x{m}" for d, m in shapes if d * m > devices]
  if too_big:
    raise ValueError(f"config.meshes: {too_big} need more than the {devices} devices here; "
                     f"raise config.cpu_devices (CPU) or drop them.")
  bench = BenchConfig(batch_sizes=tuple(config.batch_sizes), prompt_tokens=config.prompt_tokens,
                      new_tokens=config.new_tokens, repeats=config.repeats,
                      bandwidth_gbps=measured_read_gbps())
  rows = []
  for shape in shapes:
    for row in bench_meshes(model, bench, [shape], log=lambda _: None):
      rows.append({"mesh": row.system.split()[-1], "batch": row.batch,
                   "decode_tok_s": row.decode_tok_s, "ms_per_step": row.ms_per_step})
      progress(1)
  fig, ax = common.figure(f"Mesh shapes ({config.model}, {devices} {jax.default_backend()} "
                          f"devices)", "mesh (data x model)", "generated tokens / s")
  width = 0.8 / len(config.batch_sizes)
  for i, batch in enumerate(config.batch_sizes):
    line = [r for r in rows if r["batch"] == batch]
    ax.bar([j + i * width for j in range(len(line))], [r["decode_tok_s"] for r in line],
           width, label=f"batch {batch}")
  ax.set_xticks([j + width * (len(config.batch_sizes) - 1) / 2 for j in range(len(shapes))],
                [f"{d}x{m}" for d, m in shapes])
  ax.legend()
  return {"rows": rows, "devices": devices, "platform": jax.default_backend()}, {"meshes": fig}
