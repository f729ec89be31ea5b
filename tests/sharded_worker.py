"""Sharded runs on CPU devices, in processes of their own (JAX fixes the device count when it
starts); each prints one JSON object that test_sharding.py asserts on.

  python tests/sharded_worker.py tiny|smollm2      8 devices: meshes against one device
  python tests/sharded_worker.py process ID N PORT  process ID of N (2 devices each), joined
                                                     through jax.distributed at 127.0.0.1:PORT
"""

import dataclasses
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count="
                           + ("2" if sys.argv[1] == "process" else "8"))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import jinfer  # pylint: disable=g-import-not-at-top,wrong-import-position
import jinfer.distributed  # pylint: disable=g-import-not-at-top,wrong-import-position
from jinfer import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jinfer.cache.kv_cache import KVCache  # pylint: disable=g-import-not-at-top,wrong-import-position
from jinfer.models import config as config_lib, llama  # pylint: disable=g-import-not-at-top,wrong-import-position
from jinfer.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

MESHES = [(1, 1), (2, 4), (4, 2), (8, 1), (1, 8)]
GREEDY = jinfer.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def tiny_model():
  # 3 KV heads, as SmolLM2: no model axis of 2, 4 or 8 divides them (padded heads).
  cfg = dataclasses.replace(config_lib.TINY_GQA, n_heads=6, n_kv_heads=3, d_ff=96)
  return jinfer.Model(cfg, llama.init_params(cfg, jax.random.key(0)), ByteTokenizer())


def weight_fractions(model) -> list[float]:
  """For every weight sharded over `model`: the bytes one device holds / the whole weight's."""
  fractions = []
  specs = jax.tree.leaves(sharding.param_specs(model.params),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for array, spec in zip(jax.tree.leaves(model.params), specs):
    if sharding.MODEL in spec:
      shard = array.addressable_shards[0].data
      fractions.append(shard.nbytes / array.nbytes)
  return fractions


def decode_step_hlo(model) -> str:
  """The compiled HLO of one decode step (4 rows, one token each, through a contiguous cache)."""
  cache = KVCache.init(model.config, 4, 32)
  tokens, positions = np.zeros((4, 1), np.int32), np.full((4, 1), 3, np.int32)
  step = jax.jit(lambda p, t, q, c: llama.forward(p, model.config, t, q, c))
  with sharding.use(model.mesh):
    return step.lower(model.params, tokens, positions, cache).compile().as_text()


def logits_error(model, want) -> float:
  tokens = np.asarray([[1, 5, 9, 14, 2, 7, 3, 8]] * 8) % model.config.vocab_size
  got = np.asarray(model.logits(tokens))
  return float(np.abs(got - want).max() / np.abs(want).max())


def main(kind: str) -> None:
  model = tiny_model() if kind == "tiny" else jinfer.load_model("smollm2-135m-instruct")
  prompts = ["hello world", "a", "the quick brown fox", "xyz" * 5]
  out = {"devices": jax.device_count(), "meshes": {}}
  tokens = np.asarray([[1, 5, 9, 14, 2, 7, 3, 8]] * 8) % model.config.vocab_size
  for weights in ("float32", "int8"):
    base = model if weights == "float32" else model.quantize("int8")
    want_tokens = [c.token_ids for c in jinfer.generate(base, prompts, GREEDY)]
    want_logits = np.asarray(base.logits(tokens))
    # The tiny model (the fast tier) runs int8 on two meshes; SmolLM2 on all of them.
    meshes = MESHES if weights == "float32" or kind != "tiny" else [(2, 4), (1, 8)]
    for data, tp in meshes:
      sharded = base.shard({"data": data, "model": tp})
      got = [c.token_ids for c in jinfer.generate(sharded, prompts, GREEDY)]
      fractions = weight_fractions(sharded)
      out["meshes"][f"{weights} {data}x{tp}"] = {
          "model_axis": tp, "same_tokens": got == want_tokens,
          "logits_error": logits_error(sharded, want_logits),
          "min_fraction": min(fractions, default=1.0), "max_fraction": max(fractions, default=1.0),
          "num_sharded": len(fractions)}
  hlo = decode_step_hlo(model.shard({"data": 2, "model": 4}))
  out["all_reduces"] = hlo.count(" all-reduce(")
  out["all_gathers"] = hlo.count(" all-gather(")
  out["native_matmuls"] = hlo.count("jinfer_matmul_f32")
  out["native_attention"] = hlo.count("jinfer_decode_rope_attention_f32")
  out["n_layers"] = model.config.n_layers
  if kind == "tiny":
    want = jinfer.generate(model, prompts, GREEDY)
    llm = jinfer.LLM(model, max_num_seqs=4, max_model_len=64, page_size=4, max_batched_tokens=16,
                     mesh={"model": 4})
    out["engine_same_tokens"] = ([c.token_ids for c in llm.generate(prompts, GREEDY)]
                                 == [c.token_ids for c in want])
    dp = jinfer.LLM(model, max_num_seqs=2, max_model_len=64, page_size=4, max_batched_tokens=16,
                    mesh={"data": 2, "model": 4})
    out["data_parallel_engine_same_tokens"] = (
        [c.token_ids for c in dp.generate(prompts, GREEDY)] == [c.token_ids for c in want])
    out["data_parallel_replicas_used"] = sum(
        m["generated_tokens"] > 0 for m in dp.engine.metrics()["replicas"])
    # int4: codes, scales and offsets split with their weight (groups of 16 fit each shard).
    int4 = model.quantize("int4", group_size=16)
    out["int4_same_tokens"] = (
        [c.token_ids for c in jinfer.generate(int4, prompts, GREEDY, mesh={"data": 4, "model": 2})]
        == [c.token_ids for c in jinfer.generate(int4, prompts, GREEDY)])
    try:
      model.quantize("int4", group_size=32).shard({"data": 1, "model": 4})
      out["int4_bad_groups_refused"] = False
    except jinfer.InvalidRequestError as e:
      out["int4_bad_groups_refused"] = "group" in str(e)
    # Axes of 3: the vocabulary (256) pads to 258 rows, and is not padded again when the
    # sharded model is quantized or split into data rows; 4 prompts pad to 6 rows for data 3.
    odd = model.shard({"data": 2, "model": 3})
    odd_llm = jinfer.LLM(odd.quantize("int8"), max_num_seqs=2, max_model_len=64, page_size=4,
                         max_batched_tokens=16)
    want_int8 = [c.token_ids for c in jinfer.generate(model.quantize("int8"), prompts, GREEDY)]
    out["odd_axes_same_tokens"] = (
        [c.token_ids for c in jinfer.generate(odd, prompts, GREEDY)] == [c.token_ids for c in want]
        and [c.token_ids for c in odd_llm.generate(prompts, GREEDY)] == want_int8
        and [c.token_ids for c in jinfer.generate(model, prompts, GREEDY,
                                                  mesh={"data": 3, "model": 2})]
        == [c.token_ids for c in want])
    try:  # one paged pool for all rows: not split over data shards, so refused there
      jinfer.generate(dataclasses.replace(model, attention_impl="pallas"), prompts, GREEDY,
                      mesh={"data": 2, "model": 1})
      out["paged_data_axis_refused"] = False
    except jinfer.InvalidRequestError as e:
      out["paged_data_axis_refused"] = "data axis" in str(e)
    # Warm-up on a mesh compiles everything a request needs.
    warm = jinfer.LLM(model, max_num_seqs=4, max_model_len=64, page_size=4,
                      max_batched_tokens=16, mesh={"model": 4})
    warm.engine.warmup()
    compiled = warm.engine.metrics()["num_compilations"]
    warm.generate(prompts, GREEDY)
    out["mesh_compilations_after_warmup"] = warm.engine.metrics()["num_compilations"] - compiled
    mesh = {"data": 2, "model": 4}
    beam = jinfer.BeamSearchParams(beam_width=2, max_tokens=5)
    out["beam_same"] = ([b[0].token_ids for b in jinfer.beam_search(model, prompts, beam, mesh=mesh)]
                        == [b[0].token_ids for b in jinfer.beam_search(model, prompts, beam)])
    spec = jinfer.SpeculativeConfig(method="self", draft_layers=1, num_draft_tokens=3)
    out["speculative_same"] = (
        [c.token_ids for c in jinfer.generate(model, prompts, GREEDY, speculative=spec, mesh=mesh)]
        == [c.token_ids for c in want])
  else:
    want = jinfer.generate(model, prompts, GREEDY)
    # A checkpoint saved from one mesh restores onto another, straight into its shards.
    with tempfile.TemporaryDirectory() as tmp:
      model.shard({"data": 2, "model": 4}).save(os.path.join(tmp, "ckpt"))
      restored = jinfer.load_model(os.path.join(tmp, "ckpt"), mesh={"data": 1, "model": 8})
      out["restored_same_tokens"] = ([c.token_ids for c in jinfer.generate(restored, prompts, GREEDY)]
                                     == [c.token_ids for c in want])
      out["restored_fractions"] = sorted(set(weight_fractions(restored)))
    # Quantized as it loads: never the whole float model on one device.
    int8 = jinfer.load_model("smollm2-135m-instruct", quantize="int8", mesh={"model": 4})
    out["load_quantized_same_tokens"] = (
        [c.token_ids for c in jinfer.generate(int8, prompts, GREEDY)]
        == [c.token_ids for c in jinfer.generate(model.quantize("int8"), prompts, GREEDY)])
    out["load_quantized_fractions"] = sorted(set(weight_fractions(int8)))
  print(json.dumps(out))


def multi_process(process_id: int, num_processes: int, port: int) -> None:
  """Greedy tokens of the tiny model over a data x model mesh of every process's devices."""
  if num_processes > 1:
    jinfer.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  model = tiny_model()
  prompts = ["hello world", "a", "the quick brown fox", "xyz" * 5]
  got = jinfer.generate(model, prompts, GREEDY, mesh={"data": 2, "model": -1})
  print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                    "mesh": dict(sharding.make_mesh({"data": 2, "model": -1}).shape),
                    "main": jinfer.distributed.is_main_process(),
                    "tokens": [c.token_ids for c in got]}))


if __name__ == "__main__":
  if sys.argv[1] == "process":
    multi_process(*map(int, sys.argv[2:5]))
  else:
    main(sys.argv[1])
