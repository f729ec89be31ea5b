"""Every experiment config's smoke variant runs end to end through `python -m experiments.run`
(its own process: the mesh sweep sets XLA_FLAGS before JAX starts), writing its config, results
and readable plots; the results say what each sweep promises."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

from experiments import sweeps

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("[a-z]*.py"))


def _run(tmp_path, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={tmp_path}",
                         "--noprogress", *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "XLA_FLAGS": ""})


def _outputs(tmp_path, name: str) -> tuple[dict, dict, list[pathlib.Path]]:
  (folder,) = tmp_path.glob(f"{name}-*")
  config = json.loads((folder / "config.json").read_text())
  results = json.loads((folder / "results.json").read_text())
  return config, results, sorted(folder.glob("*.png"))


def test_every_sweep_has_a_config():
  assert sorted(sweeps.NAMES) == CONFIGS


# The decoding smoke run (about 10 s) stays in the fast tier; the others are slow (15 s each).
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "decoding" else pytest.mark.slow)
                                  for n in CONFIGS])
def test_smoke_variant_writes_results_and_plots(tmp_path, name):
  out = _run(tmp_path, f"--config=experiments/configs/{name}.py:smoke")
  assert out.returncode == 0, out.stderr[-3000:]
  config, results, pngs = _outputs(tmp_path, f"{name}-smoke")
  assert config["experiment"] == name and config["model"] == "tiny-gqa"
  assert pngs and all(matplotlib.image.imread(p).shape[0] > 100 for p in pngs)
  assert f"wrote {pngs[0]}" in out.stdout
  rows = results["rows"]
  assert len(rows) == sweeps.module(name).num_points(_config(name))
  if name == "decoding":
    assert {r["strategy"] for r in rows} >= {"greedy", "beam", "speculative-ngram"}
    assert all(r["same_as_greedy"] for r in rows if r["strategy"].startswith("speculative"))
  if name == "speculative":
    assert all(r["same_as_plain"] for r in rows)
    assert all(0 <= r["acceptance"] <= 1 for r in rows if r["method"] != "none")
  if name == "quantization":
    by_name = {r["variant"]: r for r in rows}
    assert by_name["int4/g32"]["param_bytes"] < by_name["int8"]["param_bytes"] < (
        by_name["float32"]["param_bytes"])
  if name == "batch_scaling":
    assert [r["batch"] for r in rows] == [1, 2, 4]
    assert all(r["bandwidth_ceiling_tok_s"] > 0 and r["compute_ceiling_tok_s"] > 0 for r in rows)
  if name == "mesh":
    assert results["devices"] == 8 and {r["mesh"] for r in rows} == {"1x1", "1x2", "2x1"}
  if name == "engine_load":
    assert all(r["num_compilations_after_warmup"] == 0 for r in rows)
  for row in rows:
    for key in ("tok_s", "decode_tok_s"):
      if key in row:
        assert row[key] > 0


def _config(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"experiments.configs.{name}").get_config("smoke")


@pytest.mark.slow
def test_fields_are_overridden_from_the_command_line(tmp_path):
  out = _run(tmp_path, "--config=experiments/configs/batch_scaling.py:smoke",
             "--config.batch_sizes=(1,3)", "--config.new_tokens=4")
  assert out.returncode == 0, out.stderr[-3000:]
  config, results, _ = _outputs(tmp_path, "batch_scaling-smoke")
  assert config["new_tokens"] == 4 and [r["batch"] for r in results["rows"]] == [1, 3]


def test_bad_settings_are_refused_before_running(tmp_path):
  out = _run(tmp_path, "--config=experiments/configs/mesh.py:smoke", "--config.meshes=('2by2',)")
  assert out.returncode != 0 and "is not DATAxMODEL" in out.stderr
  out = _run(tmp_path / "missing", "--config=experiments/configs/mesh.py:smoke")
  assert out.returncode != 0 and "does not exist" in out.stderr
  with pytest.raises(ValueError, match="config.experiment must be one of"):
    sweeps.module("nope")
