"""Loads llama.cpp GGUF files into jinfer's float32 params layout.

Supported architectures: 'llama' (which llama.cpp also uses for Mistral and SmolLM) and 'qwen2'.
Every tensor type that `gguf.quants.dequantize` knows is dequantized to float32 on load.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

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


def load_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, Params, "Tokenizer"]:
  """Returns (config, float32 params, tokenizer) from a GGUF file."""
  from jinfer.tokenizers import Tokenizer  # Imported late: tokenizers imports nothing from here.

  reader = open_gguf(path)
  source = f"GGUF file '{path}'"
  config = config_from_gguf(reader, source)
  tokenizer = Tokenizer.from_gguf_reader(reader)  # Before the slow part: fail fast.
  return config, params_from_gguf(reader, config, source), tokenizer


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


def params_from_gguf(reader: gguf.GGUFReader, config: LlamaConfig,
                     source: str = "GGUF metadata") -> Params:
  """Dequantizes every tensor and arranges it in jinfer's params layout, checked against
  `config` (read from `source`)."""
  validation.check_layer_count([t.name for t in reader.tensors], "blk.", config, source,
                               f"{config.architecture}.block_count")
  get = _tensor_getter(reader)
  params: Params = {
      "embed": get("token_embd.weight", (config.vocab_size, config.d_model)),
      "final_norm": get("output_norm.weight", (config.d_model,)),
      "layers": [_layer(get, config, i) for i in range(config.n_layers)],
  }
  if not config.tie_embeddings:
    params["lm_head"] = get("output.weight", (config.vocab_size, config.d_model))
  validation.check_params(params, config, source)
  return params


def _tensor_getter(reader: gguf.GGUFReader) -> Callable[[str, tuple[int, ...]], np.ndarray]:
  tensors = _tensor_by_name(reader)

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise CheckpointError(
          f"GGUF tensor '{name}' is missing; the file is incomplete or not a "
          "Llama-family model. Re-download or re-convert it.")
    value = _dequantize(tensors[name])
    if value.shape != shape:
      raise CheckpointError(
          f"GGUF tensor '{name}' has shape {value.shape}, expected {shape} from the metadata; "
          "the file is inconsistent. Re-convert it.")
    return value

  return get


def _layer(get: Callable[[str, tuple[int, ...]], np.ndarray], config: LlamaConfig,
           i: int) -> dict[str, np.ndarray]:
  d, n, k, h, f = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                   config.d_ff)
  p = f"blk.{i}."
  # Only 'llama' files carry the interleaved-RoPE row permutation; qwen2 uses NEOX order already.
  fix = ((lambda w, heads: unpermute_rows(w, heads)) if config.architecture == "llama"
         else (lambda w, heads: w))
  layer = {
      "attn_norm": get(p + "attn_norm.weight", (d,)),
      "wq": fix(get(p + "attn_q.weight", (n * h, d)), n).reshape(n, h, d),
      "wk": fix(get(p + "attn_k.weight", (k * h, d)), k).reshape(k, h, d),
      "wv": get(p + "attn_v.weight", (k * h, d)).reshape(k, h, d),
      "wo": get(p + "attn_output.weight", (d, n * h)).reshape(d, n, h),
      "mlp_norm": get(p + "ffn_norm.weight", (d,)),
      "w_gate": get(p + "ffn_gate.weight", (f, d)),
      "w_up": get(p + "ffn_up.weight", (f, d)),
      "w_down": get(p + "ffn_down.weight", (d, f)),
  }
  if config.qkv_bias:
    layer["bq"] = fix(get(p + "attn_q.bias", (n * h,)), n).reshape(n, h)
    layer["bk"] = fix(get(p + "attn_k.bias", (k * h,)), k).reshape(k, h)
    layer["bv"] = get(p + "attn_v.bias", (k * h,)).reshape(k, h)
  return {name: np.ascontiguousarray(w) for name, w in llama.pack_layer(layer).items()}
