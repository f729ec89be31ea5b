"""Sharding over meshes of 8 CPU devices (1x1, 2x4, 4x2, 8x1, 1x8 as data x model) equals one
device; each device holds its share of every sharded weight; the decode step all-reduces after
the row-parallel matmuls and still runs the native kernels. The runs happen in
`sharded_worker.py`, in a process of its own (JAX fixes the device count when it starts)."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

import jinfer
from jinfer import sharding
from jinfer.errors import InvalidRequestError

WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker.py")


def _run_worker(kind: str) -> dict:
  done = subprocess.run([sys.executable, WORKER, kind], capture_output=True, text=True,
                        timeout=1800, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_runs():
  return _run_worker("tiny")


def _check_meshes(runs: dict, expected: int) -> None:
  assert runs["devices"] == 8
  assert len(runs["meshes"]) == expected
  for name, run in runs["meshes"].items():
    assert run["same_tokens"], name
    assert run["logits_error"] < 1e-4, (name, run["logits_error"])
    # Replicating a weight would leave its shard the whole weight.
    assert run["num_sharded"] > 0, name
    assert run["min_fraction"] == run["max_fraction"] == 1 / run["model_axis"], (name, run)


def _check_decode_step(runs: dict) -> None:
  # Row-parallel attention output and MLP down per layer, plus the vocabulary-parallel lookup.
  assert runs["all_reduces"] == 2 * runs["n_layers"] + 1
  assert runs["native_matmuls"] > 0 and runs["native_attention"] > 0
  assert runs["all_gathers"] == 0  # no weight (nor anything else) is gathered


def test_tiny_model_sharded_equals_one_device(tiny_runs):
  _check_meshes(tiny_runs, expected=7)
  _check_decode_step(tiny_runs)


def test_tiny_engine_beam_search_and_speculative_sharded_equal_one_device(tiny_runs):
  assert tiny_runs["engine_same_tokens"]
  assert tiny_runs["beam_same"]
  assert tiny_runs["speculative_same"]
  assert tiny_runs["int4_same_tokens"] and tiny_runs["int4_bad_groups_refused"]
  assert tiny_runs["odd_axes_same_tokens"]
  assert tiny_runs["paged_data_axis_refused"]
  assert tiny_runs["mesh_compilations_after_warmup"] == 0
  # mesh 2x4: one tensor-parallel engine per data row, both serving.
  assert tiny_runs["data_parallel_engine_same_tokens"]
  assert tiny_runs["data_parallel_replicas_used"] == 2


@pytest.mark.slow
def test_smollm2_sharded_equals_one_device_float32_and_int8(smollm2_gguf_path):
  del smollm2_gguf_path  # the worker loads the model from the cache this fixture fills
  runs = _run_worker("smollm2")
  _check_meshes(runs, expected=10)
  _check_decode_step(runs)
  assert runs["restored_same_tokens"]
  assert runs["restored_fractions"] == [1 / 8]
  assert runs["load_quantized_same_tokens"] and runs["load_quantized_fractions"] == [1 / 4]


def test_two_processes_give_the_tokens_of_one():
  # Two processes of 2 devices each (CPU collectives through gloo) against one process of 2.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, WORKER, "process", str(i), "2", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  one = subprocess.run([sys.executable, WORKER, "process", "0", "1", "0"], capture_output=True,
                       text=True, timeout=600, check=True)
  alone = json.loads(one.stdout.strip().splitlines()[-1])
  assert [o["processes"] for o in outs] == [2, 2] and alone["processes"] == 1
  assert outs[0]["devices"] == 4 and outs[0]["mesh"] == {"data": 2, "model": 2}
  assert alone["mesh"] == {"data": 2, "model": 1}
  assert [o["main"] for o in outs] == [True, False]
  assert outs[0]["tokens"] == outs[1]["tokens"] == alone["tokens"]


def test_mesh_from_sizes_and_its_errors():
  assert sharding.make_mesh({"data": 1, "model": -1}).shape == {"data": 1, "model": 1}
  assert sharding.make_mesh({}).shape == {"data": 1, "model": 1}
  for bad in ({"model": 2}, {"data": -1, "model": -1}, {"model": 0}, {"tensor": 1}, [1, 1],
              {"model": 1.5}):
    with pytest.raises(InvalidRequestError, match="mesh"):
      sharding.make_mesh(bad)


def test_one_device_mesh_shards_nothing_and_equals_unsharded(tiny_model):
  prompts = ["hello", "abc"]
  params = jinfer.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
  want = [c.token_ids for c in jinfer.generate(tiny_model, prompts, params)]
  got = jinfer.generate(tiny_model, prompts, params, mesh={"data": 1, "model": 1})
  assert [c.token_ids for c in got] == want
  sharded = tiny_model.shard({"model": 1})
  assert sharded.shard(sharded.mesh) is sharded
  assert jax.tree.leaves(sharded.params)[0].sharding.mesh == sharded.mesh
