"""Weight quantization: error bounds, packing, the quantized model, Orbax round trips, and the
quality targets on the real model (perplexity on jinfer/data's text)."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.quant import weights as qw


def _random_weight(shape=(48, 64), seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_int8_error_is_at_most_half_a_step(group_size):
  w = _random_weight().at[3].set(0.0)  # an all-zero row must not divide by zero
  q = qw.quantize_int8(w, group_size)
  assert q.codes.dtype == jnp.int8 and q.group_size == group_size
  step = q.scales[:, None] if group_size is None else jnp.repeat(q.scales, group_size, axis=1)
  error = jnp.abs(q.dequantize() - w)
  assert bool(jnp.all(error <= step / 2 + 1e-7)), float(jnp.max(error - step / 2))
  assert bool(jnp.all(q.dequantize()[3] == 0))
  assert int(jnp.max(jnp.abs(q.codes))) == 127  # the absmax of each row/group maps to +-127


@pytest.mark.parametrize("group_size", [8, 32])
def test_int4_error_packing_and_range(group_size):
  w = _random_weight() + 0.5  # off-centre groups: the offset keeps full resolution
  q = qw.quantize_int4(w, group_size)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (48, 32) and q.shape == (48, 64)
  assert q.scales.dtype == q.offsets.dtype == jnp.float16  # 16-bit, as GGUF's Q4_1
  assert q.nbytes == 48 * 32 + 2 * 2 * 48 * (64 // group_size)  # codes + f16 scales, offsets
  step = jnp.repeat(q.scales.astype(jnp.float32), group_size, axis=1)
  offset = jnp.repeat(jnp.abs(q.offsets.astype(jnp.float32)), group_size, axis=1)
  error = jnp.abs(q.dequantize() - w)
  # Half a step, plus float16's rounding of the offset (the group's minimum) and of 15 steps.
  bound = step / 2 + (offset + 15 * step) * 2.0**-11
  assert bool(jnp.all(error <= bound + 1e-7)), float(jnp.max(error - bound))
  codes = qw._unpack_int4(q.codes)
  assert int(codes.min()) == 0 and int(codes.max()) == 15
  # Each group's minimum is stored as float16 exactly, its maximum up to 15 rounded steps.
  w_groups = w.reshape(48, -1, group_size)
  np.testing.assert_array_equal(q.offsets, w_groups.min(-1).astype(jnp.float16))


def test_int4_recovers_weights_already_on_a_4_bit_grid():
  """GGUF Q4_1 blocks (32 wide, min -> code 0, max -> code 15, as llama.cpp quantizes) come back
  exactly: SmolLM2's projections are such blocks."""
  codes = np.random.default_rng(1).integers(0, 16, (8, 64))
  codes[:, 0::32], codes[:, 1::32] = 0, 15
  scale, offset = 0.25, -1.0
  w = jnp.asarray(codes * scale + offset, jnp.float32)
  np.testing.assert_allclose(qw.quantize_int4(w).dequantize(), w, atol=1e-6)


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int8", 32), ("int4", None),
                                              ("int4", 16)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_linear_equals_matmul_with_dequantized_weight(mode, group_size, dtype, tol):
  q = qw.quantize(_random_weight(), mode, group_size)
  if mode == "int4" and dtype == jnp.float32:
    # The CPU kernel with AVX-512 VNNI or AVX2 keeps about 15 bits of each activation (two int8
    # levels per block of 32 inputs, for integer dot products): measured 1.5e-5 of the largest
    # output.
    tol = 1e-4
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 64)), dtype)
  y = qw.linear(x, q)
  chex.assert_type(y, dtype)
  chex.assert_shape(y, (2, 3, 48))
  expected = jnp.einsum("BTI,OI->BTO", x.astype(jnp.float32), q.dequantize())
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=tol * scale)


def test_bad_settings_are_rejected_with_the_fix():
  w = _random_weight()
  with pytest.raises(jinfer.InvalidRequestError, match="does not divide the 64 inputs"):
    qw.quantize_int8(w, 24)
  with pytest.raises(jinfer.InvalidRequestError, match="must be even"):
    qw.quantize_int4(w, 7)
  with pytest.raises(jinfer.InvalidRequestError, match="int3"):
    qw.quantize(w, "int3")


def test_weights_beyond_float16_are_refused_for_int4(tiny_model):
  params = dict(tiny_model.params, layers=[dict(layer) for layer in tiny_model.params["layers"]])
  params["layers"][1]["wo"] = params["layers"][1]["wo"].at[0, 0].set(-1e5)  # minimum: offset
  with pytest.raises(jinfer.InvalidRequestError, match=r"layers\[1\]\.wo.*int8 instead"):
    qw.quantize_params(params, "int4")
  assert qw.describe(qw.quantize_params(params, "int8"))["mode"] == "int8"  # float32 scales


def test_quantize_params_and_model(tiny_model):
  q8 = tiny_model.quantize("int8")
  assert q8.quantization == {"mode": "int8", "group_size": None, "embeddings": False}
  assert isinstance(q8.params["layers"][0]["w_qkv"], qw.QuantizedWeight)
  assert tiny_model.quantization is None
  with pytest.raises(jinfer.InvalidRequestError, match="already quantized"):
    q8.quantize("int4")
  q4e = tiny_model.quantize("int4", embeddings=True)
  assert q4e.quantization == {"mode": "int4", "group_size": 32, "embeddings": True}
  assert qw.param_bytes(q4e.params) < qw.param_bytes(tiny_model.params) / 3
  tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
  reference = tiny_model.logits(tokens)
  # Max |logit error| relative to the largest logit, measured: int8 0.9%, int8 g16 0.7%, int4
  # with int8 embeddings 11.6% (random N(0, 0.02) weights are the worst case for 16 levels).
  for model, bound in ((q8, 0.03), (tiny_model.quantize("int8", group_size=16), 0.03),
                       (tiny_model.quantize("w8a8"), 0.05), (q4e, 0.25)):
    logits = model.logits(tokens)
    chex.assert_equal_shape([logits, reference])
    chex.assert_tree_all_finite(logits)
    error = float(jnp.max(jnp.abs(logits - reference))) / float(jnp.max(jnp.abs(reference)))
    assert error < bound, (model.quantization, error)


def test_quantized_generate_matches_dequantized_float_model(tiny_model):
  """The quantized decode loop computes the model its dequantized weights define."""
  params = jinfer.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
  for mode in ("int8", "int4"):  # (w8a8 also rounds activations: not a float model's tokens)
    quantized = tiny_model.quantize(mode)
    dequantized = dataclasses.replace(tiny_model, params=qw.dequantize_params(quantized.params))
    got = jinfer.generate(quantized, ["hello there", "a"], params)
    want = jinfer.generate(dequantized, ["hello there", "a"], params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


@pytest.mark.parametrize("mode", ["int4", "w8a8"])
def test_orbax_round_trip_keeps_quantized_form(tiny_model, tmp_path, mode):
  from jinfer.checkpoints import orbax_io
  model = tiny_model.quantize(mode, embeddings=True)
  tokenizer = _hf_tokenizer(tmp_path)
  orbax_io.save(tmp_path / "ckpt", model.config, model.params, tokenizer)
  meta = json.loads((tmp_path / "ckpt" / orbax_io.CONFIG_FILE).read_text())
  assert meta["quantization"] == model.quantization
  assert meta["quantization"]["mode"] == mode and meta["quantization"]["embeddings"]
  restored = jinfer.load_model(str(tmp_path / "ckpt"), quantize=mode)
  assert restored.quantization == model.quantization
  # Same tree (quantized weights stay quantized, with the same group sizes), shapes, dtypes and
  # values.
  chex.assert_trees_all_equal_structs(model.params, restored.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(model.params, restored.params)
  chex.assert_trees_all_equal(model.params, restored.params)
  tokens = np.arange(10)[None]
  np.testing.assert_array_equal(model.logits(tokens), restored.logits(tokens))
  with pytest.raises(jinfer.InvalidRequestError, match="cannot be re-quantized"):
    jinfer.load_model(str(tmp_path / "ckpt"), quantize="int8" if mode == "int4" else "int4")


def test_load_model_rejects_unknown_quantize():
  with pytest.raises(jinfer.InvalidRequestError,
                     match=r"quantize must be one of \[None, 'int8', 'w8a8', 'int4'\], got 'int3'"):
    jinfer.load_model("no-such-model", quantize="int3")


def _hf_tokenizer(tmp_path):
  from jinfer.tokenizers import Tokenizer
  from test_checkpoints import write_hf_tokenizer
  (tmp_path / "tok").mkdir()
  write_hf_tokenizer(tmp_path / "tok")
  return Tokenizer.from_hf_dir(tmp_path / "tok")


# ----------------------------------------------------------------------------- the real model

_BASELINE = {}


def _float_scores(smollm2):
  if "nll" not in _BASELINE:
    from jinfer import evaluate
    ids = smollm2.tokenizer.encode(evaluate.default_text())
    _BASELINE["ids"] = ids
    _BASELINE["nll"], _BASELINE["argmax"] = evaluate.score(smollm2, ids, chunk_size=1024)
  return _BASELINE


@pytest.mark.slow
@pytest.mark.parametrize("mode, group_size, max_increase, min_agreement", [
    ("int8", None, 0.01, 0.9),  # the targets: int8 within 1%, int4 within 5%
    ("w8a8", None, 0.05, 0.85),  # per-token activation rounding: measured +3.9%, 88.7% agreement
    ("int4", None, 0.05, 0.9),
    # Groups of 64 straddle the checkpoint's own 32-wide Q4_1 blocks: the already 4-bit weights
    # are rounded to a second grid. Not a target, a measured regression bound: +29%, 70% agreement
    # (an MSE-searched clipping range only got +27%).
    ("int4", 64, 0.35, 0.65),
])
def test_quantized_perplexity_within_target(smollm2, mode, group_size, max_increase,
                                            min_agreement):
  from jinfer import evaluate
  base = _float_scores(smollm2)
  float_ppl = float(np.exp(np.mean(base["nll"])))
  assert 5 < float_ppl < 50, float_ppl  # a sane model on English prose
  quantized = smollm2.quantize(mode, group_size=group_size)
  nll, argmax = evaluate.score(quantized, base["ids"], chunk_size=1024)
  ppl = float(np.exp(np.mean(nll)))
  agreement = float(np.mean(argmax == base["argmax"]))
  print(f"{mode} group={group_size}: perplexity {ppl:.4f} vs float32 {float_ppl:.4f} "
        f"({ppl / float_ppl - 1:+.2%}), teacher-forced greedy agreement {agreement:.1%}")
  assert ppl <= float_ppl * (1 + max_increase)
  assert agreement > min_agreement


@pytest.mark.slow
def test_int8_kv_cache_and_bfloat16_perplexity(smollm2):
  """The KV cache format is part of what perplexity measures: the text goes through the cache."""
  from jinfer import evaluate
  base = _float_scores(smollm2)
  float_ppl = float(np.exp(np.mean(base["nll"])))
  for name, model, max_increase in [
      ("int8 KV", dataclasses.replace(smollm2, kv_cache_dtype="int8"), 0.01),
      ("bfloat16", dataclasses.replace(smollm2, params=jax.tree.map(
          lambda x: x.astype(jnp.bfloat16), smollm2.params)), 0.01)]:
    nll, argmax = evaluate.score(model, base["ids"], chunk_size=1024)
    ppl = float(np.exp(np.mean(nll)))
    agreement = float(np.mean(argmax == base["argmax"]))
    print(f"{name}: perplexity {ppl:.4f} vs float32 {float_ppl:.4f} "
          f"({ppl / float_ppl - 1:+.2%}), teacher-forced greedy agreement {agreement:.1%}")
    assert abs(ppl / float_ppl - 1) <= max_increase
    assert agreement > 0.9
