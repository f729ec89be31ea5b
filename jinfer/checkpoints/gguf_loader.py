"""Loads llama.cpp GGUF files into jinfer's params layout.

Supported architectures: 'llama' (which llama.cpp also uses for Mistral and SmolLM) and 'qwen2'.
Every tensor type that `gguf.quants.dequantize` knows is dequantized to float32 on load, except
when a quantized load is asked for and a layer's projections are all in a block format jinfer
stores as it is (`DIRECT_TYPES`): Q4_0 and Q4_1 blocks become int4 weights and Q8_0 blocks int8
weights with groups of 32, with no round trip through float and the same dequantized values.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import gguf
import numpy as np

from jinfer.checkpoints import validation
from jinfer.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from jinfer.models import llama
from jinfer.models.config import LlamaConfig, RopeScaling, invalid_config

if TYPE_CHECKING:
  from jinfer.tokenizers import Tokenizer

Params = dict[str, Any]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Exceptions GGUFReader raises on a short or garbled file (it parses with numpy views and struct).
_READER_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error,
                  UnicodeDecodeError, EOFError, OSError)


def load_gguf(path: str | os.PathLike,
              quantize: Optional[str] = None) -> tuple[LlamaConfig, Params, "Tokenizer"]:
  """Returns (config, params, tokenizer) from a GGUF file: float32 params, or with `quantize`
  ('int8', 'w8a8', 'int4') projections quantized (straight from the file's blocks where their
  format allows, see `params_from_gguf`)."""
  from jinfer.tokenizers import Tokenizer  # Imported late: tokenizers imports nothing from here.

  reader = open_gguf(path)
  source = f"GGUF file '{path}'"
  config = config_from_gguf(reader, source)
  tokenizer = Tokenizer.from_gguf_reader(reader)  # Before the slow part: fail fast.
  return config, params_from_gguf(reader, config, source, quantize=quantize), tokenizer


def load_gguf_params(path: str | os.PathLike) -> tuple[LlamaConfig, Params]:
  """Like `load_gguf` without the tokenizer (for weight-only tools and tests)."""
  reader = open_gguf(path)
  source = f"GGUF file '{path}'"
  config = config_from_gguf(reader, source)
  return config, params_from_gguf(reader, config, source)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens a GGUF file, turning the reader's low-level exceptions into a CheckpointError."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(
        f"GGUF file not found: '{path}'. Check the path, or pass a registry name such as "
        "'smollm2-135m-instruct' to download the default model.")
  try:
    return gguf.GGUFReader(path, "r")
  except PermissionError as e:
    raise CheckpointError(f"cannot read GGUF file '{path}' ({e}); fix its permissions.") from e
  except _READER_ERRORS as e:
    raise CheckpointError(
        f"GGUF file '{path}' is truncated or corrupt ({type(e).__name__}: {e}); "
        "delete it and re-download it.") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = None, required: bool = False) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise CheckpointError(
          f"GGUF metadata key '{key}' is missing; the file was not written by a llama.cpp "
          "converter jinfer understands. Re-convert it with llama.cpp's convert_hf_to_gguf.py.")
    return default
  return field.contents()


def _f32(value: Any) -> float:
  """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
  return float(str(np.float32(value)))


def config_from_gguf(reader: gguf.GGUFReader, source: str = "GGUF metadata") -> LlamaConfig:
  """Builds the architecture config from GGUF metadata (`source` names the file in errors)."""
  arch = _field(reader, "general.architecture", required=True)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedArchitectureError(
        f"GGUF architecture '{arch}' is not supported; jinfer loads "
        f"{list(SUPPORTED_ARCHITECTURES)}. Use a model of one of those families.")
  try:
    return _config_from_gguf(reader, arch, source)
  except ConfigError as e:  # LlamaConfig's and RopeScaling's own checks.
    raise invalid_config(source, e) from e


def _positive_int(reader: gguf.GGUFReader, key: str, source: str, default: Any = None,
                  required: bool = False) -> int:
  """A metadata value as a positive int, checked before anything divides by it."""
  value = _field(reader, key, default, required)
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    value = int(value)
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise CheckpointError(f"{source} metadata {key}={value!r} is not a positive integer; the "
                          "file is damaged or per-layer values jinfer does not support. "
                          "Re-convert it with llama.cpp's convert_hf_to_gguf.py.")
  return int(value)


def _config_from_gguf(reader: gguf.GGUFReader, arch: str, source: str) -> LlamaConfig:
  key = lambda name: f"{arch}.{name}"
  positive = lambda name, default=None, required=False: _positive_int(
      reader, key(name), source, default, required)
  d_model = positive("embedding_length", required=True)
  n_heads = positive("attention.head_count", required=True)
  if _field(reader, key("attention.key_length")) is None and d_model % n_heads:
    raise CheckpointError(
        f"{source} metadata {key('embedding_length')}={d_model} is not a multiple of "
        f"{key('attention.head_count')}={n_heads}, and there is no "
        f"{key('attention.key_length')} giving the head width. Re-convert the file.")
  head_dim = positive("attention.key_length", d_model // n_heads)
  rope_dims = positive("rope.dimension_count", head_dim)
  if rope_dims != head_dim:
    raise UnsupportedArchitectureError(
        f"GGUF rope.dimension_count={rope_dims} differs from head_dim={head_dim} (partial rotary "
        "embeddings); jinfer rotates whole heads only. Use a model with full rotary embeddings.")
  tensor_names = {t.name for t in reader.tensors}
  if "blk.0.attn_output.bias" in tensor_names:
    raise UnsupportedArchitectureError(
        "GGUF has an attention output bias (blk.*.attn_output.bias); jinfer's Llama-family "
        "model has none. Use a model without an output-projection bias.")
  rope_theta = _f32(_field(reader, key("rope.freq_base"), 10_000.0))
  return LlamaConfig(
      vocab_size=_vocab_size(reader, arch),
      d_model=d_model,
      n_layers=positive("block_count", required=True),
      n_heads=n_heads,
      n_kv_heads=positive("attention.head_count_kv", n_heads),
      head_dim=head_dim,
      d_ff=positive("feed_forward_length", required=True),
      rope_theta=rope_theta,
      rope_scaling=_rope_scaling(reader, arch, head_dim, rope_theta),
      norm_eps=_f32(_field(reader, key("attention.layer_norm_rms_epsilon"), 1e-5)),
      tie_embeddings="output.weight" not in tensor_names,
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      max_seq_len=positive("context_length", 2048),
      architecture=arch,
  )


def _vocab_size(reader: gguf.GGUFReader, arch: str) -> int:
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  if tokens is not None:
    return len(tokens.data)
  size = _field(reader, f"{arch}.vocab_size")
  if size is not None:
    return int(size)
  embed = _tensor_by_name(reader).get("token_embd.weight")
  if embed is None:
    raise CheckpointError("GGUF has no token list, no vocab_size and no token_embd.weight; "
                          "the file is incomplete. Re-download or re-convert it.")
  return int(embed.shape[-1])  # GGUF shapes are reversed: [D, V].


def _rope_scaling(reader: gguf.GGUFReader, arch: str, head_dim: int,
                  theta: float) -> Optional[RopeScaling]:
  kind = _field(reader, f"{arch}.rope.scaling.type", "none")
  if kind == "linear":
    return RopeScaling(kind="linear", factor=_f32(_field(reader, f"{arch}.rope.scaling.factor")))
  if kind not in ("none", ""):
    raise UnsupportedArchitectureError(
        f"GGUF rope scaling type '{kind}' is not supported; jinfer implements 'linear' and "
        "Llama 3 ('rope_freqs' tensor). Use a model with one of those.")
  freqs = _tensor_by_name(reader).get("rope_freqs.weight")
  if freqs is None:
    return None
  # llama.cpp stores Llama 3.1 scaling as per-frequency divisors, not as metadata.
  return fit_llama3_scaling(_dequantize(freqs), head_dim, theta)


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
  """Per-frequency divisors of Llama 3.1 RoPE scaling, as llama.cpp's converter writes them."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / inv_freq
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor) /
            (scaling.high_freq_factor - scaling.low_freq_factor))
  medium = 1.0 / ((1 - smooth) / scaling.factor + smooth)
  return np.where(wavelen < high_wavelen, 1.0,
                  np.where(wavelen > low_wavelen, scaling.factor, medium))


def fit_llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling:
  """Recovers a RopeScaling that reproduces llama.cpp's `rope_freqs` divisors.

  (original_max_position, low, high) are only defined up to a common scale, so low is fixed at 1.
  """
  factors = np.asarray(factors, np.float64).reshape(-1)
  factor = float(factors.max())
  inv_wavelen = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)) / (2 * math.pi)
  medium = (factors > 1 + 1e-6) & (factors < factor - 1e-6 * factor)
  try:
    candidate = RopeScaling(kind="llama3", factor=factor)
    if medium.sum() >= 2 and factor > 1:
      # In the medium band smooth = (1/f - 1/factor) / (1 - 1/factor) = a / wavelen + b.
      smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
      a, b = np.polyfit(inv_wavelen[medium], smooth, 1)
      high = float(_tidy(1 - 1 / b))
      candidate = RopeScaling(kind="llama3", factor=factor, low_freq_factor=1.0,
                              high_freq_factor=high, original_max_position=_tidy(a * (high - 1)))
  except ConfigError:  # the fitted values are no valid scaling: these are not Llama 3 factors
    candidate = None
  if candidate is None or factors.shape[0] != head_dim // 2 or not np.allclose(
      llama3_rope_factors(head_dim, theta, candidate), factors, rtol=1e-4):
    raise UnsupportedArchitectureError(
        "GGUF rope_freqs tensor does not follow Llama 3.1 RoPE scaling; jinfer cannot reproduce "
        "these frequencies. Use a model with llama3 or linear RoPE scaling.")
  return candidate


def _tidy(x: float) -> float | int:
  """Snaps a fitted value to the nearby integer the original config surely had."""
  return int(round(x)) if abs(x - round(x)) < 1e-4 * max(1.0, abs(x)) else float(x)


def _tensor_by_name(reader: gguf.GGUFReader) -> dict[str, Any]:
  return {t.name: t for t in reader.tensors}


def _dequantize(tensor: Any) -> np.ndarray:
  """Any GGUF tensor -> float32 numpy array in numpy (row-major, reversed-GGUF) shape."""
  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise CheckpointError(
        f"GGUF tensor '{tensor.name}' has type {tensor.tensor_type.name}, which gguf "
        f"{getattr(gguf, '__version__', '')} cannot dequantize; re-quantize the model to a "
        "supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K).") from e
  shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first.
  out = np.asarray(values, dtype=np.float32).reshape(shape)
  # F32 tensors come back as read-only views of the memory map: give callers their own copy.
  return out if out.flags.writeable else out.copy()


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> half-rotation RoPE layout).

  Works on weights [n_head * head_dim, d_in] and biases [n_head * head_dim].
  """
  head_dim = w.shape[0] // n_head
  return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation (the inverse of `unpermute_rows`), for writing files."""
  head_dim = w.shape[0] // n_head
  return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF block formats stored as they are, by quantize mode: each 32-input block's codes and
# float16 scale (and Q4_1's float16 minimum) are exactly an int4 / int8 group of 32.
DIRECT_TYPES = {"int4": (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1),
                "int8": (gguf.GGMLQuantizationType.Q8_0,)}
DIRECT_GROUP = 32  # inputs per GGUF block


class Blocks(NamedTuple):
  """A GGUF tensor's blocks as [O, I] integer codes with a scale (and offset) per 32 inputs:
  w = codes * scales + offsets. 4-bit codes are uint8 in [0, 15] with float16 scales and
  offsets; 8-bit codes are int8 with float32 scales (each a float16 value) and no offsets."""
  codes: np.ndarray
  scales: np.ndarray
  offsets: Optional[np.ndarray]

  def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "Blocks":
    """The same blocks with `fn` applied to each array (row permutations, reshapes)."""
    return Blocks(fn(self.codes), fn(self.scales),
                  None if self.offsets is None else fn(self.offsets))


def read_blocks(tensor: Any) -> Blocks:
  """A Q4_0, Q4_1 or Q8_0 tensor's raw bytes as `Blocks` (layouts of ggml's block_q4_0,
  block_q4_1 and block_q8_0: a float16 d (and m), then the codes; a 4-bit block stores input j
  in the low nibble of byte j and input j + 16 in its high nibble)."""
  qtype = tensor.tensor_type
  out_features, in_features = (int(n) for n in reversed(tensor.shape))
  groups = in_features // DIRECT_GROUP
  raw = np.asarray(tensor.data, np.uint8).reshape(out_features, groups, -1)
  half = lambda start: raw[..., start:start + 2].copy().view("<f2")[..., 0].astype(np.float16)
  if qtype == gguf.GGMLQuantizationType.Q8_0:
    codes = raw[..., 2:].copy().view(np.int8).reshape(out_features, in_features)
    return Blocks(codes, half(0).astype(np.float32), None)
  scales = half(0)
  if qtype == gguf.GGMLQuantizationType.Q4_1:
    offsets, nibbles = half(2), raw[..., 4:]
  else:  # Q4_0: (q - 8) * d = q * d + (-8 d); -8 d is exact in float16 (checked by the caller)
    offsets, nibbles = scales * np.float16(-8), raw[..., 2:]
  codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
  return Blocks(codes.reshape(out_features, in_features), scales, offsets)


def params_from_gguf(reader: gguf.GGUFReader, config: LlamaConfig,
                     source: str = "GGUF metadata", quantize: Optional[str] = None) -> Params:
  """Reads every tensor into jinfer's params layout, checked against `config` (read from
  `source`).

  quantize ('int8', 'w8a8', 'int4'): the projections come back quantized. A layer whose
  projections are all in a `DIRECT_TYPES` format of that mode keeps the file's blocks; any
  other is dequantized and quantized again (in groups of 32 when the file has direct blocks,
  so every layer has the same format). Everything else is float32.
  """
  validation.check_layer_count([t.name for t in reader.tensors], "blk.", config, source,
                               f"{config.architecture}.block_count")
  get = _tensor_getter(reader, DIRECT_TYPES.get(quantize, ()))
  layers = [_layer(get, config, i) for i in range(config.n_layers)]
  params: Params = {
      "embed": get("token_embd.weight", (config.vocab_size, config.d_model), float_only=True),
      "final_norm": get("output_norm.weight", (config.d_model,), float_only=True),
      "layers": layers,
  }
  if not config.tie_embeddings:
    params["lm_head"] = get("output.weight", (config.vocab_size, config.d_model),
                            float_only=True)
  if quantize is not None:
    params["layers"] = _quantized_layers(layers, quantize)
  validation.check_params(params, config, source)
  return params


def _quantized_layers(layers: list[dict], mode: str) -> list[dict]:
  """Each layer's projections as QuantizedWeights: `Blocks` as they are, float ones quantized."""
  from jinfer.quant import weights as quant_weights  # pylint: disable=g-import-not-at-top
  direct = any(isinstance(layer["w_qkv"], Blocks) for layer in layers)
  group_size = DIRECT_GROUP if direct else None
  out = []
  for layer in layers:
    layer = dict(layer)
    for name in quant_weights.PROJECTIONS:
      w = layer[name]
      if isinstance(w, Blocks) and w.offsets is not None:
        layer[name] = quant_weights.QuantizedWeight(
            quant_weights.pack_int4(w.codes), w.scales, w.offsets, bits=4)
      elif isinstance(w, Blocks):
        layer[name] = quant_weights.QuantizedWeight(w.codes, w.scales, bits=8)
      else:
        layer[name] = quant_weights.quantize(w, mode, group_size)
    out.append(layer)
  return out


def _tensor_getter(reader: gguf.GGUFReader, direct_types: tuple = ()) -> Callable[..., Any]:
  """get(name, shape, float_only=False): the tensor as float32, or as `Blocks` when its type is
  one of `direct_types` (and its blocks represent it exactly)."""
  tensors = _tensor_by_name(reader)

  def get(name: str, shape: tuple[int, ...], float_only: bool = False) -> np.ndarray | Blocks:
    if name not in tensors:
      raise CheckpointError(
          f"GGUF tensor '{name}' is missing; the file is incomplete or not a "
          "Llama-family model. Re-download or re-convert it.")
    tensor = tensors[name]
    got = tuple(int(n) for n in reversed(tensor.shape))
    if got != shape:
      raise CheckpointError(
          f"GGUF tensor '{name}' has shape {got}, expected {shape} from the metadata; "
          "the file is inconsistent. Re-convert it.")
    if not float_only and tensor.tensor_type in direct_types and len(shape) == 2:
      blocks = read_blocks(tensor)
      if all(np.isfinite(x).all() for x in (blocks.scales, blocks.offsets) if x is not None):
        return blocks
    return _dequantize(tensor)

  return get


def _dequantized(x: np.ndarray | Blocks) -> np.ndarray:
  if not isinstance(x, Blocks):
    return x
  w = x.codes.astype(np.float32).reshape(*x.scales.shape, DIRECT_GROUP)
  w = w * x.scales[..., None].astype(np.float32)
  if x.offsets is not None:
    w = w + x.offsets[..., None].astype(np.float32)
  return w.reshape(x.codes.shape)


def _layer(get: Callable[..., Any], config: LlamaConfig, i: int) -> dict[str, Any]:
  """Layer i packed (`llama.pack_layer`): float arrays, or `Blocks` projections when every
  projection of the layer came back as blocks of one bit width."""
  d, n, k, h, f = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                   config.d_ff)
  p = f"blk.{i}."
  # Only 'llama' files carry the interleaved-RoPE row permutation; qwen2 uses NEOX order already.
  fix = ((lambda w, heads: unpermute_rows(w, heads)) if config.architecture == "llama"
         else (lambda w, heads: w))
  projections = {
      "wq": (get(p + "attn_q.weight", (n * h, d)), n),
      "wk": (get(p + "attn_k.weight", (k * h, d)), k),
      "wv": (get(p + "attn_v.weight", (k * h, d)), None),
      "wo": (get(p + "attn_output.weight", (d, n * h)), None),
      "w_gate": (get(p + "ffn_gate.weight", (f, d)), None),
      "w_up": (get(p + "ffn_up.weight", (f, d)), None),
      "w_down": (get(p + "ffn_down.weight", (d, f)), None),
  }
  # Rows of q and k un-permuted, q/k/v split by head (pack_layer's [heads, H, inputs] inputs).
  split = {"wq": n, "wk": k, "wv": k}

  def arrange(name: str, w: np.ndarray) -> np.ndarray:
    heads = projections[name][1]
    w = w if heads is None else fix(w, heads)
    return w.reshape(split[name], h, -1) if name in split else w

  kinds = {type(w) if not isinstance(w, Blocks) else (Blocks, w.offsets is None)
           for w, _ in projections.values()}
  if len(kinds) == 1 and isinstance(next(iter(projections.values()))[0], Blocks):
    parts = [llama.pack_layer({name: arrange(name, part(w)) for name, (w, _) in
                               projections.items()})
             for part in (lambda b: b.codes, lambda b: b.scales, lambda b: b.offsets
                          if b.offsets is not None else b.scales)]
    has_offsets = next(iter(projections.values()))[0].offsets is not None
    layer = {name: Blocks(parts[0][name], parts[1][name], parts[2][name] if has_offsets else None)
             for name in parts[0]}
  else:
    layer = llama.pack_layer({name: arrange(name, _dequantized(w))
                              for name, (w, _) in projections.items()})
  layer["attn_norm"] = get(p + "attn_norm.weight", (d,), float_only=True)
  layer["mlp_norm"] = get(p + "ffn_norm.weight", (d,), float_only=True)
  if config.qkv_bias:
    bias = {"bq": (get(p + "attn_q.bias", (n * h,), float_only=True), n),
            "bk": (get(p + "attn_k.bias", (k * h,), float_only=True), k),
            "bv": (get(p + "attn_v.bias", (k * h,), float_only=True), None)}
    layer["b_qkv"] = np.concatenate([
        (b if heads is None else fix(b, heads)).reshape(kv, -1, h)
        for (b, heads), kv in zip(bias.values(), (k, k, k))], axis=1).reshape(-1)
  return {name: w if isinstance(w, Blocks) else np.ascontiguousarray(w)
          for name, w in layer.items()}
