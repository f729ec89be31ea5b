"""Checkpoint loaders: GGUF (all quant types, Q/K permutation), HF safetensors, Orbax."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import hypothesis
import hypothesis.strategies as st
import jax
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from jinfer.checkpoints import gguf_loader, hf_loader, orbax_io
from jinfer.checkpoints import load_gguf, load_gguf_params, load_hf_dir
from jinfer.errors import CheckpointError, UnsupportedArchitectureError
from jinfer.models import config as config_lib
from jinfer.models import llama
from jinfer.models.config import LlamaConfig, RopeScaling


@pytest.fixture
def real_gguf(smollm2_gguf_path) -> Path:
  """The real SmolLM2 GGUF file (conftest's session fixture; its tests are slow)."""
  return Path(smollm2_gguf_path)


# ---------------------------------------------------------------------------------------------
# Writing tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py does.

TINY = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   d_ff=128, rope_theta=10_000.0, norm_eps=1e-5, max_seq_len=256)
# Rows of 256 for the K-quants (their block is 256 values).
TINY_K = dataclasses.replace(TINY, d_model=256, n_layers=1, head_dim=64, d_ff=256)


def convert_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Copied from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_weights(cfg: LlamaConfig, seed: int = 0, *, bias: bool = False,
               untied: bool = False) -> dict:
  """Random weights in Hugging Face layout (Linear weights are [out, in])."""
  rng = np.random.default_rng(seed)
  d, n, k, h, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  w = {"embed": r(v, d), "norm": 1 + r(d) / 10, "layers": []}
  if untied:
    w["output"] = r(v, d)
  for _ in range(cfg.n_layers):
    layer = {"attn_norm": 1 + r(d) / 10, "q": r(n * h, d), "k": r(k * h, d), "v": r(k * h, d),
             "o": r(d, n * h), "ffn_norm": 1 + r(d) / 10, "gate": r(f, d), "up": r(f, d),
             "down": r(d, f)}
    if bias:
      layer.update(bq=r(n * h), bk=r(k * h), bv=r(k * h))
    w["layers"].append(layer)
  return w


def unpacked(params: dict, cfg: LlamaConfig) -> dict:
  """Params with each layer's fused projections split back into wq/wk/wv/w_gate/w_up."""
  return {**params, "layers": [llama.unpack_layer(l, cfg) for l in params["layers"]]}


def expected_params(cfg: LlamaConfig, w: dict) -> dict:
  """The unfused params layout (compare with `unpacked(loaded)`), built from HF-layout weights."""
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  p = {"embed": w["embed"], "final_norm": w["norm"], "layers": []}
  if "output" in w:
    p["lm_head"] = w["output"]
  for l in w["layers"]:
    e = {"attn_norm": l["attn_norm"], "wq": l["q"].reshape(n, h, d),
         "wk": l["k"].reshape(k, h, d), "wv": l["v"].reshape(k, h, d),
         "wo": l["o"].reshape(d, n, h), "mlp_norm": l["ffn_norm"], "w_gate": l["gate"],
         "w_up": l["up"], "w_down": l["down"]}
    if "bq" in l:
      e.update(bq=l["bq"].reshape(n, h), bk=l["bk"].reshape(k, h), bv=l["bv"].reshape(k, h))
    p["layers"].append(e)
  return p


_GGUF_NAMES = {"attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight",
               "v": "attn_v.weight", "o": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
               "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
               "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}


def gguf_tensors(cfg: LlamaConfig, w: dict, permute: bool) -> dict[str, np.ndarray]:
  """GGUF tensor name -> numpy array (numpy shape), q/k rows permuted like the converter."""
  out = {"token_embd.weight": w["embed"], "output_norm.weight": w["norm"]}
  if "output" in w:
    out["output.weight"] = w["output"]
  for i, layer in enumerate(w["layers"]):
    for key, value in layer.items():
      if permute and key in ("q", "bq"):
        value = convert_permute(value, cfg.n_heads)
      if permute and key in ("k", "bk"):
        value = convert_permute(value, cfg.n_kv_heads)
      out[f"blk.{i}.{_GGUF_NAMES[key]}"] = value
  return out


def byte_vocab() -> list[str]:
  """3 ChatML specials, 252 GPT-2 byte-alphabet characters and one merged token 'ab'."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  chars, extra = [], 0
  for b in range(256):
    chars.append(chr(b) if b in printable else chr(256 + extra))
    extra += b not in printable
  return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars[:252], "ab"]


def write_gguf(path: Path, cfg: LlamaConfig, tensors: dict, *, arch: str = "llama",
               qtype: QT = QT.F32, raw: dict | None = None, tokenizer: bool = True,
               extra_kv=None) -> Path:
  """Writes a GGUF file; 2-D tensors in `qtype` (norms and biases stay F32, like llama.cpp)."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg.n_layers)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_rope_dimension_count(cfg.head_dim)
  if tokenizer:
    tokens = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
  if extra_kv:
    extra_kv(writer)
  for name, value in tensors.items():
    if raw and name in raw:
      writer.add_tensor(name, raw[name], raw_dtype=qtype)
    elif value.ndim == 1 or qtype == QT.F32:
      writer.add_tensor(name, value.astype(np.float32))
    elif qtype == QT.F16:
      writer.add_tensor(name, value.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def assert_params_equal(actual: dict, expected: dict, atol: float = 0.0) -> None:
  """Compares loaded (fused) params with unfused expected ones."""
  expected = {**expected, "layers": [llama.pack_layer(l) for l in expected["layers"]]}
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for path, a in jax.tree_util.tree_leaves_with_path(actual):
    e = expected
    for key in path:
      e = e[key.key if hasattr(key, "key") else key.idx]
    assert a.dtype == np.float32, path
    assert a.shape == e.shape, path
    np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# GGUF: layout, permutation, config.


def test_llama_gguf_loads_exact_weights_config_and_tokenizer(tmp_path):
  w = hf_weights(TINY, untied=True)
  path = write_gguf(tmp_path / "tiny.gguf", TINY, gguf_tensors(TINY, w, permute=True))
  config, params, tokenizer = load_gguf(path)
  assert config == dataclasses.replace(TINY, architecture="llama", tie_embeddings=False)
  assert_params_equal(params, expected_params(TINY, w))
  assert tokenizer.vocab_size == 256 and tokenizer.eos_id == 2
  assert tokenizer.encode("ab") == [255]  # the merge applies: the vocab came from the file
  # Sanity: the file really holds permuted rows, so loading did undo something.
  assert not np.array_equal(convert_permute(w["layers"][0]["q"], 4), w["layers"][0]["q"])


def test_unpermute_inverts_the_converter_on_a_hand_example():
  # One head of dim 4: HF rows [a0 a1 b0 b1] (halves rotate together) become [a0 b0 a1 b1].
  w = np.array([[0.], [1.], [2.], [3.]])
  assert convert_permute(w, 1).ravel().tolist() == [0, 2, 1, 3]
  assert gguf_loader.unpermute_rows(convert_permute(w, 1), 1).ravel().tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(gguf_loader.permute_rows(w, 1), convert_permute(w, 1))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(n_head=st.integers(1, 6), half=st.integers(1, 8), d_in=st.integers(0, 5))
def test_unpermute_inverts_the_converter(n_head, half, d_in):
  rows = n_head * 2 * half
  w = np.arange(rows * max(d_in, 1), dtype=np.float32).reshape((rows, d_in) if d_in else (rows,))
  np.testing.assert_array_equal(gguf_loader.unpermute_rows(convert_permute(w, n_head), n_head), w)


def test_qwen2_gguf_keeps_rows_and_loads_biases(tmp_path):
  w = hf_weights(TINY, seed=1, bias=True)
  path = write_gguf(tmp_path / "qwen.gguf", TINY, gguf_tensors(TINY, w, permute=False),
                    arch="qwen2")
  config, params = load_gguf_params(path)
  assert config.architecture == "qwen2" and config.qkv_bias and config.tie_embeddings
  assert "lm_head" not in params
  assert_params_equal(params, expected_params(TINY, w))


def test_llama_gguf_unpermutes_biases(tmp_path):
  w = hf_weights(TINY, seed=2, bias=True)
  path = write_gguf(tmp_path / "b.gguf", TINY, gguf_tensors(TINY, w, permute=True))
  config, params = load_gguf_params(path)
  assert config.qkv_bias
  assert_params_equal(params, expected_params(TINY, w))


# Worst-case error of each format as a fraction of max|w| (+1% for its f16 block scales): half a
# step, except Q4_0/Q5_0, whose scale maps the signed extreme to -8/-16 and clips its opposite to
# +7/+15, a whole step off.
QUANT_TOLERANCE = {QT.F16: 2**-11, QT.BF16: 2**-8, QT.Q8_0: 1 / 254, QT.Q4_0: 1 / 8,
                   QT.Q4_1: 1 / 15, QT.Q5_0: 1 / 16, QT.Q5_1: 1 / 31}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_gguf_dequantizes_within_format_error(tmp_path, qtype):
  w = hf_weights(TINY, seed=3, untied=True)
  path = write_gguf(tmp_path / "q.gguf", TINY, gguf_tensors(TINY, w, permute=True), qtype=qtype)
  _, params = load_gguf_params(path)
  # Exactly the format's own dequantization (blocks run along rows, so the permutation commutes)...
  roundtrip = jax.tree.map(
      lambda x: x if x.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(
          x.astype(np.float16) if qtype == QT.F16 else x, qtype), qtype).reshape(x.shape), w)
  assert_params_equal(params, expected_params(TINY, roundtrip))
  # ...and within half a quantization step of the float32 original, but not equal to it.
  original = expected_params(TINY, w)
  for name in ("wq", "wk", "w_down"):
    err = np.abs(unpacked(params, TINY)["layers"][1][name] - original["layers"][1][name]).max()
    scale = np.abs(original["layers"][1][name]).max()
    assert 0 < err <= 1.01 * QUANT_TOLERANCE[qtype] * scale, (name, err / scale)


@pytest.mark.parametrize("qtype,mode,bits", [(QT.Q4_0, "int4", 4), (QT.Q4_1, "int4", 4),
                                              (QT.Q8_0, "int8", 8)], ids=lambda x: str(x))
def test_block_formats_load_straight_into_quantized_weights(tmp_path, qtype, mode, bits):
  """Q4_0/Q4_1 -> int4 and Q8_0 -> int8 groups of 32 with no round trip through float: the
  dequantized weights equal the float load's bit for bit, q/k rows un-permuted and fused."""
  from jinfer.quant import weights as qw  # pylint: disable=g-import-not-at-top
  w = hf_weights(TINY, seed=5, untied=True)
  path = write_gguf(tmp_path / "q.gguf", TINY, gguf_tensors(TINY, w, permute=True), qtype=qtype)
  _, quantized, _ = load_gguf(path, quantize=mode)
  _, floats, _ = load_gguf(path)
  for got, want in zip(quantized["layers"], floats["layers"]):
    for name in qw.PROJECTIONS:
      q = got[name]
      assert isinstance(q, qw.QuantizedWeight) and q.bits == bits and q.group_size == 32
      assert q.scales.dtype == (np.float16 if bits == 4 else np.float32)
      np.testing.assert_array_equal(np.asarray(q.dequantize()), want[name], err_msg=name)
    np.testing.assert_array_equal(got["attn_norm"], want["attn_norm"])
  np.testing.assert_array_equal(quantized["embed"], floats["embed"])  # embeddings stay float
  assert qw.describe(quantized) == {"mode": mode, "group_size": 32, "embeddings": False}


def test_other_formats_are_quantized_from_float_on_a_quantized_load(tmp_path):
  from jinfer.quant import weights as qw  # pylint: disable=g-import-not-at-top
  w = hf_weights(TINY, seed=6, untied=True)
  path = write_gguf(tmp_path / "q.gguf", TINY, gguf_tensors(TINY, w, permute=True),
                    qtype=QT.Q4_1)
  _, params, _ = load_gguf(path, quantize="int8")  # Q4_1 is no int8 block: per channel
  assert qw.describe(params) == {"mode": "int8", "group_size": None, "embeddings": False}
  path = write_gguf(tmp_path / "f.gguf", TINY, gguf_tensors(TINY, w, permute=True))
  _, params, _ = load_gguf(path, quantize="int4")  # F32: quantized with the default groups
  assert qw.describe(params) == {"mode": "int4", "group_size": 32, "embeddings": False}


def test_load_model_keeps_the_files_blocks(tmp_path):
  import jinfer  # pylint: disable=g-import-not-at-top
  w = hf_weights(TINY, seed=7, untied=True)
  path = write_gguf(tmp_path / "q.gguf", TINY, gguf_tensors(TINY, w, permute=True),
                    qtype=QT.Q4_1)
  model = jinfer.load_model(str(path), quantize="int4")
  floats = jinfer.load_model(str(path))
  params = jinfer.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
  want = np.asarray(floats.logits([[3, 4, 5]]))  # same weights, another summation order
  # The int4 CPU kernel with AVX-512 VNNI or AVX2 keeps ~15 bits of each activation (two int8
  # levels per block of 32): measured 3e-5 of the largest logit here.
  np.testing.assert_allclose(model.logits([[3, 4, 5]]), want, atol=2e-4 * np.abs(want).max())
  assert ([c.token_ids for c in jinfer.generate(model, [[3, 4, 5]], params)]
          == [c.token_ids for c in jinfer.generate(floats, [[3, 4, 5]], params)])


# K-quants: gguf 0.19 cannot quantize them in numpy, so these encoders write blocks by hand from
# the C layouts in ggml-quants.c (dequantize_row_q{4,5,6}_K). All sub-block scales are 1 and
# mins/offsets are fixed, so an integer grid times each block's d is represented exactly.
K_BITS = {QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6}


def _f16_bytes(d: np.ndarray) -> np.ndarray:
  return d.astype("<f2").view(np.uint8).reshape(*d.shape, 2)


def encode_k_quant(u: np.ndarray, d: np.ndarray, qtype: QT) -> np.ndarray:
  """u: [rows, cols] uint8 codes; d: [rows, cols // 256] block scales -> raw GGUF bytes."""
  rows, cols = u.shape
  nb = cols // 256
  bcast = lambda a: np.broadcast_to(np.asarray(a, np.uint8), (rows, nb, len(a)))
  if qtype == QT.Q6_K:  # ql[128] qh[64] scales[16] d; value = d * (q - 32)
    q = u.reshape(rows, nb, 2, 4, 32)  # 128-halves, then the l+0/32/64/96 quarters
    lo, hi = q & 0xF, q >> 4
    ql = np.concatenate([lo[:, :, :, 0] | lo[:, :, :, 2] << 4,
                         lo[:, :, :, 1] | lo[:, :, :, 3] << 4], axis=-1).reshape(rows, nb, 128)
    qh = (hi[:, :, :, 0] | hi[:, :, :, 1] << 2 | hi[:, :, :, 2] << 4
          | hi[:, :, :, 3] << 6).reshape(rows, nb, 64)
    blocks = [ql, qh, bcast([1] * 16), _f16_bytes(d)]
  else:  # d dmin scales[12] (qh[32]) qs[128]; value = d * sc * q - dmin * m, here dmin = d
    q = u.reshape(rows, nb, 4, 2, 32)  # 64-chunks, low/high nibble halves
    lo, hi = q & 0xF, q >> 4
    qs = (lo[:, :, :, 0] | lo[:, :, :, 1] << 4).reshape(rows, nb, 128)
    if qtype == QT.Q4_K:  # sc = 1, m = 8 for all 8 sub-blocks (6-bit packing)
      blocks = [_f16_bytes(d), _f16_bytes(d), bcast([1] * 4 + [8] * 4 + [0x81] * 4), qs]
    else:  # Q5_K: sc = 1, m = 16: m's bit 4 sits in bits 6-7 of bytes 4..7
      shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
      qh = np.bitwise_or.reduce(hi << shifts[None, None, :, :, None], axis=(2, 3))
      blocks = [_f16_bytes(d), _f16_bytes(d), bcast([1] * 4 + [16 | 64] * 4 + [1] * 4), qh, qs]
  return np.concatenate(blocks, axis=-1).reshape(rows, -1)


def k_quant_matrix(rng, shape, qtype):
  """(values, codes, block scales) with values exactly representable in `qtype`."""
  bits = K_BITS[qtype]
  u = rng.integers(0, 2 ** bits, size=shape, dtype=np.uint8)
  d = rng.choice(np.array([0.125, 0.25, 0.5], np.float32), size=(shape[0], shape[1] // 256))
  offset = {QT.Q4_K: 8, QT.Q5_K: 16, QT.Q6_K: 32}[qtype]
  values = (u.astype(np.float32) - offset) * np.repeat(d, 256, axis=1)
  return values, u, d


@pytest.mark.parametrize("qtype", list(K_BITS), ids=lambda q: q.name)
def test_k_quant_gguf_loads_exactly(tmp_path, qtype):
  rng = np.random.default_rng(4)
  cfg = TINY_K
  w = hf_weights(cfg, seed=4, untied=True)
  raw = {}
  for key, name in (("embed", "token_embd.weight"), ("output", "output.weight")):
    w[key], u, d = k_quant_matrix(rng, w[key].shape, qtype)
    raw[name] = encode_k_quant(u, d, qtype)
  for i, layer in enumerate(w["layers"]):
    for key in ("q", "k", "v", "o", "gate", "up", "down"):
      layer[key], u, d = k_quant_matrix(rng, layer[key].shape, qtype)
      heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}.get(key)
      if heads:  # the converter permutes rows before quantizing: permute codes and scales
        u, d = convert_permute(u, heads), convert_permute(d, heads)
      raw[f"blk.{i}.{_GGUF_NAMES[key]}"] = encode_k_quant(u, d, qtype)
  path = write_gguf(tmp_path / "k.gguf", cfg, gguf_tensors(cfg, w, permute=True), qtype=qtype,
                    raw=raw)
  reader = gguf.GGUFReader(path)
  assert {t.tensor_type for t in reader.tensors if t.name in raw} == {qtype}
  _, params = load_gguf_params(path)
  assert_params_equal(params, expected_params(cfg, w))


def test_gguf_rope_scaling_metadata(tmp_path):
  w = hf_weights(TINY)
  linear = write_gguf(
      tmp_path / "lin.gguf", TINY, gguf_tensors(TINY, w, True), extra_kv=lambda wr: (
          wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), wr.add_rope_scaling_factor(4.0)))
  assert load_gguf_params(linear)[0].rope_scaling == RopeScaling(kind="linear", factor=4.0)
  # llama.cpp writes Llama 3.1 scaling as a rope_freqs tensor of per-frequency divisors.
  scaling = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                        original_max_position=2048)
  tensors = gguf_tensors(TINY, w, True) | {"rope_freqs.weight": gguf_loader.llama3_rope_factors(
      TINY.head_dim, TINY.rope_theta, scaling).astype(np.float32)}
  config, _ = load_gguf_params(write_gguf(tmp_path / "l3.gguf", TINY, tensors))
  assert config.rope_scaling == scaling


def test_llama3_rope_factors_match_transformers():
  from transformers import LlamaConfig as HFLlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  scaling = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=8192)
  hf = HFLlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={
      "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  factors = gguf_loader.llama3_rope_factors(128, 500000.0, scaling)
  np.testing.assert_allclose(base / factors, inv_freq.double().numpy(), rtol=1e-6)
  assert gguf_loader.fit_llama3_scaling(factors, 128, 500000.0) == scaling
  with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
    gguf_loader.fit_llama3_scaling(factors[::-1].copy(), 128, 500000.0)


# ---------------------------------------------------------------------------------------------
# GGUF errors.


def test_missing_gguf_file(tmp_path):
  with pytest.raises(CheckpointError, match="not found") as e:
    load_gguf(tmp_path / "nope.gguf")
  assert str(tmp_path / "nope.gguf") in str(e.value)


@pytest.mark.parametrize("keep", [0, 3, 200, 0.5, -100], ids=lambda k: f"keep={k}")
def test_truncated_gguf(tmp_path, keep):
  good = write_gguf(tmp_path / "good.gguf", TINY, gguf_tensors(TINY, hf_weights(TINY), True))
  data = good.read_bytes()
  n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(data[:n])
  with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
    load_gguf(bad)
  assert "re-download" in str(e.value) and str(bad) in str(e.value)


def test_garbage_file_is_reported_corrupt(tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_gguf_params(bad)


def test_unknown_gguf_architecture(tmp_path):
  path = write_gguf(tmp_path / "g.gguf", TINY, gguf_tensors(TINY, hf_weights(TINY), False),
                    arch="gemma")
  with pytest.raises(UnsupportedArchitectureError) as e:
    load_gguf(path)
  for word in ("'gemma'", "not supported", "llama", "qwen2"):
    assert word in str(e.value)


def test_missing_gguf_tensor_is_named(tmp_path):
  tensors = gguf_tensors(TINY, hf_weights(TINY), True)
  del tensors["blk.1.ffn_up.weight"]
  path = write_gguf(tmp_path / "m.gguf", TINY, tensors)
  with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_up\.weight' is missing"):
    load_gguf_params(path)


def test_gguf_without_tokenizer_loads_weights_but_not_a_tokenizer(tmp_path):
  w = hf_weights(TINY)
  path = write_gguf(tmp_path / "nt.gguf", TINY, gguf_tensors(TINY, w, True), tokenizer=False)
  config, params = load_gguf_params(path)
  assert config.vocab_size == 256  # from token_embd when there is no token list
  assert_params_equal(params, expected_params(TINY, w))
  with pytest.raises(CheckpointError, match="tokenizer"):
    load_gguf(path)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 file.


@pytest.mark.slow
def test_real_smollm2_gguf(real_gguf):
  config, params, tokenizer = load_gguf(real_gguf)
  assert config == config_lib.SMOLLM2_135M
  assert config.norm_eps == 1e-5  # float32 metadata read back as the value it was written from
  leaves = jax.tree.leaves(params)
  assert sum(x.size for x in leaves) == 134_515_008  # 134.5M
  assert {x.dtype for x in leaves} == {np.dtype(np.float32)}
  assert "lm_head" not in params and len(params["layers"]) == 30
  assert params["layers"][0]["w_qkv"].shape == (3 * 5 * 64, 576)  # 3 KV heads x (3 q + k + v)
  layer = llama.unpack_layer(params["layers"][0], config)
  assert layer["wq"].shape == (9, 64, 576) and layer["wk"].shape == (3, 64, 576)
  assert layer["wo"].shape == (576, 9, 64) and layer["w_down"].shape == (576, 1536)
  assert all(np.isfinite(x).all() for x in leaves[:20])
  assert tokenizer.vocab_size == 49152 and tokenizer.eos_id == 2
  # Q8_0 embeddings: stored values are multiples of each 32-block's scale; spot-check one row
  # against gguf's own dequantization of the same bytes.
  reader = gguf.GGUFReader(real_gguf)
  embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
  np.testing.assert_array_equal(params["embed"][504],
                                gguf.quants.dequantize(embd.data[504:505], embd.tensor_type)[0])


def test_truncated_real_gguf(tmp_path, real_gguf):
  bad = tmp_path / "cut.gguf"
  with open(real_gguf, "rb") as f:
    bad.write_bytes(f.read(3_000_000))
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_gguf(bad)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories.


def write_hf_tokenizer(directory: Path) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(
      "the capital of france is paris".split())}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


HF_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def save_hf(model, directory: Path, **kwargs) -> dict:
  model.save_pretrained(directory, **kwargs)
  write_hf_tokenizer(directory)
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def expected_from_state_dict(cfg: LlamaConfig, sd: dict) -> dict:
  w = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"], "layers": []}
  if not cfg.tie_embeddings:
    w["output"] = sd["lm_head.weight"]
  names = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
           "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
           "o": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
           "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
           "down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
           "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
  for i in range(cfg.n_layers):
    w["layers"].append({k: sd[f"model.layers.{i}.{v}"] for k, v in names.items()
                        if f"model.layers.{i}.{v}" in sd})
  return expected_params(cfg, w)


@pytest.fixture(scope="module")
def torch_seeded():
  import torch
  torch.manual_seed(0)
  return torch


def test_hf_llama_sharded_untied_llama3(tmp_path, torch_seeded):
  from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
  hf = HFConfig(**HF_SMALL, rope_theta=50_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  sd = save_hf(LlamaForCausalLM(hf), tmp_path, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  config, params, tokenizer = load_hf_dir(tmp_path)
  assert config == LlamaConfig(
      vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
      rope_theta=50_000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), norm_eps=1e-5,
      tie_embeddings=False, qkv_bias=False, max_seq_len=512, architecture="llama")
  assert_params_equal(params, expected_from_state_dict(config, sd))
  assert tokenizer.encode("the capital of france") == [3, 4, 5, 6]


def test_hf_qwen2_tied_with_biases_in_bf16(tmp_path, torch_seeded):
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  model = Qwen2ForCausalLM(Qwen2Config(**HF_SMALL, tie_word_embeddings=True)).to(torch.bfloat16)
  sd = save_hf(model, tmp_path)
  config, params, _ = load_hf_dir(tmp_path)
  assert config.architecture == "qwen2" and config.qkv_bias and config.tie_embeddings
  assert "lm_head" not in params and llama.unpack_layer(params["layers"][0], config)["bq"].shape == (4, 16)
  # bfloat16 widens to float32 exactly.
  assert_params_equal(params, expected_from_state_dict(config, sd))


def test_hf_mistral_with_explicit_head_dim(tmp_path, torch_seeded):
  from transformers import MistralConfig, MistralForCausalLM
  model = MistralForCausalLM(MistralConfig(**HF_SMALL, head_dim=32, sliding_window=None))
  sd = save_hf(model, tmp_path)
  config, params, _ = load_hf_dir(tmp_path)
  assert (config.architecture, config.head_dim, config.n_heads) == ("mistral", 32, 4)
  assert llama.unpack_layer(params["layers"][0], config)["wq"].shape == (4, 32, 64)
  assert_params_equal(params, expected_from_state_dict(config, sd))


def base_hf_config(**overrides) -> dict:
  return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **HF_SMALL, **overrides}


def test_hf_config_transformers4_style_keys():
  config = hf_loader.config_from_hf(base_hf_config(
      rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=True))
  assert config.rope_theta == 1e6 and config.tie_embeddings
  assert config.rope_scaling == RopeScaling(kind="linear", factor=2.0)
  assert hf_loader.config_from_hf(base_hf_config()).rope_scaling is None


@pytest.mark.parametrize("overrides,words", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), ["'gpt2'", "llama", "qwen2"]),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=128),
     ["sliding_window=128", "full attention"]),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=128,
          use_sliding_window=True), ["sliding_window"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), ["'yarn'"]),
    (dict(attention_bias=True), ["attention_bias"]),
    (dict(architectures=["LlamaForSequenceClassification"]), ["LlamaForCausalLM"]),
])
def test_hf_config_unsupported_features(overrides, words):
  with pytest.raises(UnsupportedArchitectureError) as e:
    hf_loader.config_from_hf(base_hf_config(**overrides))
  for word in words:
    assert word in str(e.value)


def test_hf_config_inconsistent_or_incomplete():
  with pytest.raises(CheckpointError, match="invalid model: n_heads=4 is not a multiple"):
    hf_loader.config_from_hf(base_hf_config(num_key_value_heads=3))
  incomplete = base_hf_config()
  del incomplete["intermediate_size"]
  with pytest.raises(CheckpointError, match=r"lacks \['intermediate_size'\]"):
    hf_loader.config_from_hf(incomplete)


def test_hf_dir_errors(tmp_path, torch_seeded):
  with pytest.raises(CheckpointError, match="directory not found"):
    load_hf_dir(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(base_hf_config()))
  with pytest.raises(CheckpointError, match="No tokenizer"):
    load_hf_dir(tmp_path)
  write_hf_tokenizer(tmp_path)
  with pytest.raises(CheckpointError, match="no safetensors weights"):
    load_hf_dir(tmp_path)
  from safetensors.numpy import save_file
  from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
  sd = save_hf(LlamaForCausalLM(HFConfig(**HF_SMALL)), tmp_path / "m")
  del sd["model.layers.1.mlp.up_proj.weight"]
  save_file(sd, str(tmp_path / "m" / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    load_hf_dir(tmp_path / "m")


# ---------------------------------------------------------------------------------------------
# Orbax.


@pytest.fixture
def tiny_checkpoint(tmp_path):
  w = hf_weights(TINY, untied=True)
  return load_gguf(write_gguf(tmp_path / "t.gguf", TINY, gguf_tensors(TINY, w, True)))


@pytest.mark.parametrize("dtype,on_device", [(np.float32, False), (ml_dtypes.bfloat16, False),
                                             (ml_dtypes.bfloat16, True)],
                         ids=["float32", "bfloat16", "bfloat16-jax-arrays"])
def test_orbax_round_trip(tmp_path, tiny_checkpoint, dtype, on_device):
  config, params, tokenizer = tiny_checkpoint
  config = dataclasses.replace(config, rope_scaling=RopeScaling(kind="llama3", factor=8.0))
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  to_save = jax.tree.map(jax.numpy.asarray, params) if on_device else params  # as Model.save does
  saved = orbax_io.save(tmp_path / "ckpt", config, to_save, tokenizer)
  assert orbax_io.is_orbax_checkpoint(saved)
  config2, params2, tokenizer2 = orbax_io.load(saved)
  assert config2 == config and isinstance(config2.rope_scaling, RopeScaling)
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  assert isinstance(params2["layers"], list)
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert tokenizer2.encode("hello ab") == tokenizer.encode("hello ab")
  assert tokenizer2.eos_id == tokenizer.eos_id


def test_interrupted_orbax_save_leaves_nothing_loadable(tmp_path, tiny_checkpoint, monkeypatch):
  config, params, tokenizer = tiny_checkpoint
  target = tmp_path / "out" / "ckpt"

  def crash(directory):
    raise KeyboardInterrupt("simulated crash after the params were written")

  monkeypatch.setattr(tokenizer, "save", crash)
  with pytest.raises(KeyboardInterrupt):
    orbax_io.save(target, config, params, tokenizer)
  assert not target.exists() and list(target.parent.iterdir()) == []  # temp dir cleaned up
  assert not orbax_io.is_orbax_checkpoint(target)
  with pytest.raises(CheckpointError, match="not a complete jinfer Orbax checkpoint"):
    orbax_io.load(target)


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
  config, params, tokenizer = tiny_checkpoint
  target = orbax_io.save(tmp_path / "ckpt", config, params, tokenizer)
  with pytest.raises(CheckpointError, match="already exists"):
    orbax_io.save(target, config, params, tokenizer)
  half = jax.tree.map(lambda x: x / 2, params)

  class CrashingCheckpointer:
    def save(self, directory, tree):
      Path(directory).mkdir()
      (Path(directory) / "partial").write_bytes(b"x" * 100)
      raise OSError("simulated disk full while writing params")

  monkeypatch.setattr(orbax_io.ocp, "PyTreeCheckpointer", CrashingCheckpointer)
  with pytest.raises(OSError, match="disk full"):
    orbax_io.save(target, config, half, tokenizer, overwrite=True)
  monkeypatch.undo()
  np.testing.assert_array_equal(orbax_io.load(target)[1]["embed"], params["embed"])
  orbax_io.save(target, config, half, tokenizer, overwrite=True)
  np.testing.assert_array_equal(orbax_io.load(target)[1]["embed"], half["embed"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "t.gguf"]


def test_orbax_load_rejects_partial_directories(tmp_path, tiny_checkpoint):
  config, params, tokenizer = tiny_checkpoint
  target = orbax_io.save(tmp_path / "ckpt", config, params, tokenizer)
  shutil.rmtree(target / "params")
  assert not orbax_io.is_orbax_checkpoint(target)
  with pytest.raises(CheckpointError, match="interrupted save"):
    orbax_io.load(target)


def test_orbax_config_with_unknown_fields(tmp_path):
  with pytest.raises(CheckpointError, match=r"\['n_experts'\]"):
    orbax_io.config_from_dict(dataclasses.asdict(TINY) | {"n_experts": 8})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_reloads_a_saved_model_with_the_same_logits(tmp_path, dtype):
  import jinfer
  w = hf_weights(TINY, untied=True)
  gguf_path = write_gguf(tmp_path / "t.gguf", TINY, gguf_tensors(TINY, w, True))
  model = jinfer.load_model(str(gguf_path), dtype=dtype)
  model.save(tmp_path / "saved")
  reloaded = jinfer.load_model(str(tmp_path / "saved"), dtype=dtype)
  assert reloaded.config == model.config and reloaded.dtype == model.dtype
  ids = [[1, 5, 9, 3, 7]]
  np.testing.assert_array_equal(reloaded.logits(ids), model.logits(ids))
  assert reloaded.tokenizer.encode("hello") == model.tokenizer.encode("hello")


def test_load_model_rejects_an_unknown_dtype():
  import jinfer
  with pytest.raises(jinfer.InvalidRequestError, match="float16.*bfloat16"):
    jinfer.load_model("smollm2-135m-instruct", dtype="float16")


# ---------------------------------------------------------------------------------------------
# Saving over an existing path.


def tiny_jinfer_model(tiny_checkpoint):
  import jinfer
  config, params, tokenizer = tiny_checkpoint
  return jinfer.Model(config, params, tokenizer)


def test_model_save_overwrite_replaces_a_checkpoint(tmp_path, tiny_checkpoint):
  model = tiny_jinfer_model(tiny_checkpoint)
  target = tmp_path / "out" / "ckpt"
  model.save(target)
  with pytest.raises(CheckpointError, match="already exists.*overwrite=True"):
    model.save(target)
  halved = dataclasses.replace(model, params=jax.tree.map(lambda x: x / 2, model.params))
  halved.save(target, overwrite=True)
  np.testing.assert_array_equal(orbax_io.load(target)[1]["embed"], model.params["embed"] / 2)
  assert [p.name for p in target.parent.iterdir()] == ["ckpt"]  # no temp or old dirs left


@pytest.mark.parametrize("kind", ["user-dir", "file", "empty-dir"])
def test_overwrite_refuses_what_is_not_a_jinfer_checkpoint(tmp_path, tiny_checkpoint, kind):
  model = tiny_jinfer_model(tiny_checkpoint)
  target = tmp_path / "home"
  if kind == "file":
    target.write_text("precious")
  else:
    target.mkdir()
    if kind == "user-dir":
      (target / "notes.txt").write_text("precious")
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(CheckpointError, match="is not a jinfer checkpoint") as e:
    model.save(target, overwrite=True)
  assert str(target) in str(e.value) and "overwrite=True" in str(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it
  if kind == "user-dir":
    assert (target / "notes.txt").read_text() == "precious"
  elif kind == "file":
    assert target.read_text() == "precious"


def test_failed_swap_puts_the_old_checkpoint_back(tmp_path, tiny_checkpoint, monkeypatch):
  config, params, tokenizer = tiny_checkpoint
  target = orbax_io.save(tmp_path / "ckpt", config, params, tokenizer)
  rename = orbax_io.os.rename

  def failing_rename(src, dst):
    if Path(src).name.startswith(".ckpt.tmp-"):  # the new checkpoint moving into place
      raise OSError("simulated failure while swapping in the new checkpoint")
    rename(src, dst)

  monkeypatch.setattr(orbax_io.os, "rename", failing_rename)
  with pytest.raises(OSError, match="simulated"):
    orbax_io.save(target, config, jax.tree.map(lambda x: x / 2, params), tokenizer,
                  overwrite=True)
  monkeypatch.undo()
  np.testing.assert_array_equal(orbax_io.load(target)[1]["embed"], params["embed"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "t.gguf"]


def test_save_refuses_a_tokenizer_it_cannot_store_before_writing(tmp_path, tiny_checkpoint):
  import jinfer

  class NoSaveTokenizer:
    eos_ids = frozenset({2})

  config, params, _ = tiny_checkpoint
  with pytest.raises(CheckpointError, match=r"NoSaveTokenizer\) has no save\(directory\)"):
    jinfer.Model(config, params, NoSaveTokenizer()).save(tmp_path / "out" / "ckpt")
  assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Damaged Orbax checkpoints.


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_orbax_params_metadata_missing_or_damaged(tmp_path, tiny_checkpoint, damage):
  import jinfer
  config, params, tokenizer = tiny_checkpoint
  target = orbax_io.save(tmp_path / "ckpt", config, params, tokenizer)
  meta = target / orbax_io.PARAMS_DIR / orbax_io.PARAMS_METADATA
  if damage == "delete":
    meta.unlink()
  else:
    meta.write_bytes(meta.read_bytes()[:100])
  for load in (orbax_io.load, lambda p: jinfer.load_model(str(p))):
    with pytest.raises(CheckpointError) as e:
      load(target)
    assert str(meta) in str(e.value)
    assert ("is missing" if damage == "delete" else "is unreadable") in str(e.value)
    assert "save the checkpoint again" in str(e.value)


_LOAD_IN_SUBPROCESS = """
import sys
from jinfer.checkpoints import orbax_io
from jinfer.errors import CheckpointError
try:
  orbax_io.load(sys.argv[1])
except CheckpointError as e:
  print("CheckpointError:", e)
"""


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_orbax_data_file_is_one_clean_error(tmp_path, tiny_checkpoint, damage):
  import subprocess
  import sys
  config, params, tokenizer = tiny_checkpoint
  target = orbax_io.save(tmp_path / "ckpt", config, params, tokenizer)
  # The largest file holds the array data (several arrays: reads are in flight when one fails).
  data = max((p for p in (target / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = data.read_bytes()
  data.write_bytes(raw[:len(raw) // 2] if damage == "truncate"
                   else bytes(b ^ 0x5A for b in raw))
  proc = subprocess.run([sys.executable, "-c", _LOAD_IN_SUBPROCESS, str(target)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("CheckpointError: param '"), proc.stdout
  assert "truncated or corrupt" in proc.stdout and "Save the checkpoint again" in proc.stdout
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, (
      proc.stderr[-3000:])


# ---------------------------------------------------------------------------------------------
# Configs that do not match the weights.


def test_expected_shapes_are_what_init_params_builds():
  from jinfer.checkpoints import validation
  for cfg in (config_lib.TINY_GQA, TINY, dataclasses.replace(TINY, qkv_bias=True),
              dataclasses.replace(TINY, tie_embeddings=True, n_kv_heads=1, head_dim=8)):
    built = jax.tree.map(lambda x: tuple(x.shape), llama.init_params(cfg, jax.random.key(0)))
    assert validation.expected_shapes(cfg) == built, cfg
    validation.check_params(llama.init_params(cfg, jax.random.key(0)), cfg, "test")


def test_check_params_compares_quantized_weights_by_logical_shape():
  from jinfer.checkpoints import validation
  from jinfer.quant import weights as quant_weights
  cfg = config_lib.TINY_GQA
  params = llama.init_params(cfg, jax.random.key(0))
  for mode in ("int8", "int4"):
    quantized = quant_weights.quantize_params(params, mode, embeddings=True)
    validation.check_params(quantized, cfg, "test")
    with pytest.raises(CheckpointError, match=r"'layers\.0\.w_gate_up' has shape \(256, 64\), "
                                              r"but the config \(d_ff=64, d_model=64\)"):
      validation.check_params(quantized, dataclasses.replace(cfg, d_ff=64), "test")
  bad = quant_weights.quantize_params(params, "int8")
  w = bad["layers"][1]["wo"]
  bad["layers"][1]["wo"] = w.replace(scales=w.scales[:10])
  with pytest.raises(CheckpointError, match=r"quantized param 'layers\.1\.wo' has scales \(10,\)"):
    validation.check_params(bad, cfg, "test")


def _edited_config(tmp_path, checkpoint, edit: dict):
  """Saves `checkpoint` (config, params, tokenizer), then edits its saved config's fields;
  returns (checkpoint dir, config file)."""
  target = orbax_io.save(tmp_path / "ckpt", *checkpoint)
  config_file = target / orbax_io.CONFIG_FILE
  meta = json.loads(config_file.read_text())
  meta["config"].update(edit)
  config_file.write_text(json.dumps(meta))
  return target, config_file


@pytest.mark.parametrize("edit,words", [
    (dict(vocab_size=300), ["'embed'", "(256, 64)", "vocab_size=300", "(300, 64)"]),
    (dict(d_model=32), ["'embed'", "d_model=32", "(256, 32)"]),
    (dict(n_layers=3), ["2 layers", "n_layers=3"]),
    (dict(n_layers=1), ["2 layers", "n_layers=1"]),
    (dict(n_heads=8), ["'layers.0.w_qkv'", "n_heads=8", "(128, 64)", "(192, 64)"]),
    (dict(n_kv_heads=4), ["'layers.0.w_qkv'", "n_kv_heads=4"]),
    (dict(head_dim=8), ["'layers.0.w_qkv'", "head_dim=8"]),
    (dict(d_ff=64), ["'layers.0.w_gate_up'", "d_ff=64"]),
    (dict(tie_embeddings=True), ["'lm_head'", "tie_embeddings=True"]),
    (dict(qkv_bias=True), ["'layers.0.b_qkv' is missing", "qkv_bias=True"]),
])
def test_edited_orbax_config_is_named_before_reading_data(tmp_path, tiny_checkpoint, monkeypatch,
                                                          edit, words):
  target, config_file = _edited_config(tmp_path, tiny_checkpoint, edit)

  def no_reads(self):
    raise AssertionError("array data was read before the config was checked")

  monkeypatch.setattr(orbax_io._ParamsReader, "read", no_reads)
  with pytest.raises(CheckpointError) as e:
    orbax_io.load(target)
  for word in (*words, str(config_file), "re-save"):
    assert word in str(e.value), (word, str(e.value))


def test_edited_config_of_a_quantized_orbax_checkpoint(tmp_path, tiny_checkpoint):
  from jinfer.quant import weights as quant_weights
  config, params, tokenizer = tiny_checkpoint
  quantized = quant_weights.quantize_params(params, "int4")
  target = orbax_io.save(tmp_path / "ckpt", config, quantized, tokenizer)
  assert orbax_io.load(target)[1]["layers"][0]["w_down"].shape == (64, 128)
  config_file = target / orbax_io.CONFIG_FILE
  meta = json.loads(config_file.read_text())
  meta["config"]["d_ff"] = 256
  config_file.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"'layers\.0\.w_gate_up' has shape \(256, 64\), but "
                                            r"the config \(d_ff=256, d_model=64\) implies"):
    orbax_io.load(target)
  meta["config"]["d_ff"], meta["quantization"] = 128, {"mode": "int3"}
  config_file.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="\"quantization\" is .*int3"):
    orbax_io.load(target)


@pytest.mark.parametrize("edit,words", [
    (dict(n_heads=0), ["n_heads", "positive integer", "got 0"]),
    (dict(n_kv_heads=3), ["n_heads=4 is not a multiple of n_kv_heads=3"]),
    (dict(norm_eps=-1.0), ["norm_eps", "finite positive"]),
    (dict(rope_scaling={"kind": "llama3", "low_freq_factor": 4.0}), ["high_freq_factor"]),
    (dict(rope_scaling={"kind": "yarn"}), ["RopeScaling.kind 'yarn'"]),
    (dict(rope_scaling={"kind": "linear", "beta": 2}), ["rope_scaling", "'beta'"]),
    (dict(vocab_size=None), ["vocab_size", "positive integer"]),
])
def test_invalid_orbax_config_values(tmp_path, tiny_checkpoint, edit, words):
  target, config_file = _edited_config(tmp_path, tiny_checkpoint, edit)
  with pytest.raises(CheckpointError) as e:
    orbax_io.load(target)
  for word in (*words, str(config_file)):
    assert word in str(e.value), (word, str(e.value))
  meta = json.loads(config_file.read_text())
  del meta["config"]["d_ff"]
  config_file.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"lacks fields \['d_ff'\]"):
    orbax_io.load(target)


def test_hf_config_with_fewer_layers_than_the_weights(tmp_path, torch_seeded):
  from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
  save_hf(LlamaForCausalLM(HFConfig(**HF_SMALL)), tmp_path)
  config_file = tmp_path / "config.json"
  hf = json.loads(config_file.read_text())
  hf["num_hidden_layers"] = 1
  config_file.write_text(json.dumps(hf))
  with pytest.raises(CheckpointError) as e:
    load_hf_dir(tmp_path)
  for word in ("num_hidden_layers=1", "layer 1", "'model.layers.1.*'", str(config_file)):
    assert word in str(e.value), word


def test_gguf_block_count_lower_than_the_tensors(tmp_path):
  tensors = gguf_tensors(TINY, hf_weights(TINY), True)
  path = write_gguf(tmp_path / "b.gguf", dataclasses.replace(TINY, n_layers=1), tensors)
  with pytest.raises(CheckpointError) as e:
    load_gguf_params(path)
  for word in ("llama.block_count=1", "'blk.1.*'", str(path)):
    assert word in str(e.value), word


# ---------------------------------------------------------------------------------------------
# Config values out of range.


def test_llama_config_rejects_bad_values_by_name():
  from jinfer.errors import ConfigError, JinferError
  cases = [(dict(n_heads=0), "n_heads"), (dict(vocab_size=-1), "vocab_size"),
           (dict(d_ff=2.5), "d_ff"), (dict(n_layers=True), "n_layers"),
           (dict(n_kv_heads=3), "n_kv_heads=3"), (dict(head_dim=15), "head_dim=15"),
           (dict(rope_theta=float("inf")), "rope_theta"), (dict(norm_eps=0.0), "norm_eps"),
           (dict(max_seq_len=0), "max_seq_len"), (dict(tie_embeddings="yes"), "tie_embeddings"),
           (dict(rope_scaling={"factor": 2.0}), "rope_scaling")]
  for edit, word in cases:
    with pytest.raises(ConfigError, match=word) as e:
      dataclasses.replace(config_lib.TINY_GQA, **edit)
    assert isinstance(e.value, (JinferError, ValueError)), edit
  with pytest.raises(ConfigError, match="factor"):
    RopeScaling(kind="linear", factor=float("nan"))
  for preset in (*config_lib.PRESETS.values(), TINY, TINY_K):
    dataclasses.replace(preset)  # the presets pass their own checks
  # numpy scalars are accepted and stored as Python numbers (configs are saved as JSON).
  cfg = dataclasses.replace(TINY, n_layers=np.int64(3), rope_theta=np.float32(500.0))
  assert type(cfg.n_layers) is int and type(cfg.rope_theta) is float
  assert json.loads(json.dumps(dataclasses.asdict(cfg)))["n_layers"] == 3


@pytest.mark.parametrize("overrides,words", [
    (dict(num_attention_heads=0), ["num_attention_heads=0", "positive integer"]),
    (dict(num_attention_heads=0, head_dim=16), ["num_attention_heads=0"]),
    (dict(hidden_size=-64), ["hidden_size=-64"]),
    (dict(hidden_size=66), ["hidden_size=66", "num_attention_heads=4", "head_dim"]),
    (dict(num_key_value_heads=0), ["num_key_value_heads=0"]),
    (dict(vocab_size="big"), ["vocab_size='big'"]),
    (dict(intermediate_size=2.5), ["intermediate_size=2.5"]),
    (dict(rms_norm_eps=0), ["rms_norm_eps=0", "finite positive"]),
    (dict(rope_theta=-1.0), ["rope_theta=-1.0"]),
    (dict(rope_scaling={"rope_type": "linear"}), ["factor=None"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                        "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
     ["high_freq_factor", "must exceed"]),
    (dict(head_dim=15), ["head_dim=15", "even"]),
])
def test_hf_config_values_out_of_range(tmp_path, overrides, words):
  (tmp_path / "config.json").write_text(json.dumps(base_hf_config(**overrides)))
  with pytest.raises(CheckpointError) as e:
    hf_loader.load_hf_params(tmp_path)
  for word in (*words, str(tmp_path / "config.json")):
    assert word in str(e.value), (word, str(e.value))


def test_gguf_head_count_zero(tmp_path):
  import types
  bad = types.SimpleNamespace(**dataclasses.asdict(TINY) | {"n_heads": 0})
  path = write_gguf(tmp_path / "h.gguf", bad, gguf_tensors(TINY, hf_weights(TINY), True))
  with pytest.raises(CheckpointError) as e:
    load_gguf(path)
  for word in ("llama.attention.head_count=0", "positive integer", str(path)):
    assert word in str(e.value), word


@pytest.mark.slow
def test_real_smollm2_orbax_round_trip_and_corrupt_copy(tmp_path, real_gguf):
  import subprocess
  import sys
  import jinfer
  model = jinfer.load_model(str(real_gguf), dtype="bfloat16")
  target = tmp_path / "ckpt"
  model.save(target)
  model.save(target, overwrite=True)
  config, params, _ = orbax_io.load(target)
  assert config == model.config == config_lib.SMOLLM2_135M
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A damaged copy: one clean error, nothing from the hundreds of reads in flight on stderr.
  data = max((p for p in (target / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(data.stat().st_size // 3)
  proc = subprocess.run([sys.executable, "-c", _LOAD_IN_SUBPROCESS, str(target)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.startswith("CheckpointError: param '"), (
      proc.stdout, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, (
      proc.stderr[-3000:])
