"""Loads Hugging Face model directories (config.json + safetensors) into jinfer's params layout."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from safetensors import SafetensorError, safe_open

from jinfer.checkpoints import validation
from jinfer.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from jinfer.models import llama
from jinfer.models.config import LlamaConfig, RopeScaling, invalid_config

if TYPE_CHECKING:
  from jinfer.tokenizers import Tokenizer

Params = dict[str, Any]

# model_type -> the causal-LM class transformers writes in "architectures".
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def load_hf_dir(path: str | os.PathLike) -> tuple[LlamaConfig, Params, "Tokenizer"]:
  """Returns (config, float32 params, tokenizer) from a Hugging Face model directory."""
  from jinfer.tokenizers import Tokenizer  # Imported late: tokenizers imports nothing from here.

  path = Path(path)
  source = f"'{path / 'config.json'}'"
  config = config_from_hf(read_config_json(path), source)
  tokenizer = Tokenizer.from_hf_dir(path)  # Before the slow part: fail fast.
  with SafetensorsDir(path) as tensors:
    return config, params_from_hf(tensors, config, source), tokenizer


def load_hf_params(path: str | os.PathLike) -> tuple[LlamaConfig, Params]:
  """Like `load_hf_dir` without the tokenizer."""
  path = Path(path)
  source = f"'{path / 'config.json'}'"
  config = config_from_hf(read_config_json(path), source)
  with SafetensorsDir(path) as tensors:
    return config, params_from_hf(tensors, config, source)


def read_config_json(path: Path) -> dict[str, Any]:
  """The parsed config.json of HF model directory `path` (CheckpointError if absent/invalid)."""
  if not path.is_dir():
    raise CheckpointError(
        f"Hugging Face model directory not found: '{path}'. Pass a directory holding "
        "config.json and *.safetensors (as written by save_pretrained).")
  config_path = path / "config.json"
  if not config_path.is_file():
    raise CheckpointError(
        f"'{path}' has no config.json, so it is not a Hugging Face model directory. "
        "Save the model with transformers' save_pretrained, or pass a .gguf file.")
  try:
    return json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"'{config_path}' is not valid JSON ({e}); re-download it.") from e


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
  """Maps a transformers config.json dict onto LlamaConfig, refusing features jinfer lacks.

  `source` names the file in errors. Every value is checked (by name) before it is used.
  """
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source} holds a {type(hf).__name__}, expected a JSON object; "
                          "re-download it.")
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedArchitectureError(
        f"config.json model_type '{model_type}' is not supported; jinfer loads "
        f"{sorted(SUPPORTED_MODEL_TYPES)} ({', '.join(SUPPORTED_MODEL_TYPES.values())}).")
  _check_features(hf, model_type)
  missing = [key for key in _REQUIRED_KEYS if key not in hf]
  if missing:
    raise CheckpointError(
        f"{source} lacks {missing}; it is incomplete. Re-download it or re-save the model.")
  int_field = lambda key, default=None: _positive_int(hf, key, default, source)
  d_model = int_field("hidden_size")
  n_heads = int_field("num_attention_heads")
  if hf.get("head_dim") is None and d_model % n_heads:
    raise CheckpointError(
        f"{source} hidden_size={d_model} is not a multiple of num_attention_heads={n_heads}, and "
        "there is no head_dim to say how wide each head is; fix those values or add head_dim.")
  try:
    rope_theta, rope_scaling = _rope(hf, source)
    return LlamaConfig(
        vocab_size=int_field("vocab_size"),
        d_model=d_model,
        n_layers=int_field("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=int_field("num_key_value_heads", n_heads),
        head_dim=int_field("head_dim", d_model // n_heads),
        d_ff=int_field("intermediate_size"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=_positive_float(hf, "rms_norm_eps", 1e-6, source),
        # All three classes default to untied embeddings.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        max_seq_len=int_field("max_position_embeddings", 2048),
        architecture=model_type,
    )
  except ConfigError as e:  # LlamaConfig's own consistency checks (e.g. heads per KV head).
    raise invalid_config(source, e) from e


def _positive_int(hf: dict[str, Any], key: str, default: Any, source: str) -> int:
  """hf[key] (default when absent or null) as a positive int; 2.0 is accepted, 2.5 is not."""
  value = hf.get(key)
  value = default if value is None else value
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise CheckpointError(f"{source} {key}={value!r} is not a positive integer; fix the value "
                          "or re-download the file.")
  return value


def _positive_float(d: dict[str, Any], key: str, default: Any, source: str) -> float:
  value = d.get(key)
  value = default if value is None else value
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or value <= 0):
    raise CheckpointError(f"{source} {key}={value!r} is not a finite positive number; fix the "
                          "value or re-download the file.")
  return float(value)


def _check_features(hf: dict[str, Any], model_type: str) -> None:
  expected = SUPPORTED_MODEL_TYPES[model_type]
  architectures = hf.get("architectures") or [expected]
  if expected not in architectures:
    raise UnsupportedArchitectureError(
        f"config.json architectures {architectures} are not a causal LM jinfer loads; expected "
        f"{expected}. Save the causal-LM model (e.g. {expected}.save_pretrained).")
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedArchitectureError(
        f"hidden_act '{hf['hidden_act']}' is not supported; jinfer's MLP is SwiGLU (silu).")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise UnsupportedArchitectureError(
        "config.json sets attention_bias or mlp_bias; jinfer's Llama-family model has no "
        "output-projection or MLP biases. Use a model without them.")
  window = hf.get("sliding_window")
  # Qwen2 keeps a sliding_window value around but only uses it when use_sliding_window is set.
  uses_window = hf.get("use_sliding_window", False) if model_type == "qwen2" else True
  if window is not None and uses_window and window < hf.get("max_position_embeddings", 0):
    raise UnsupportedArchitectureError(
        f"{model_type} sliding_window={window} is smaller than max_position_embeddings="
        f"{hf.get('max_position_embeddings')}; jinfer implements full attention only, which "
        "would give wrong results past the window. Use a model without sliding-window attention.")


def _rope(hf: dict[str, Any], source: str) -> tuple[float, Optional[RopeScaling]]:
  """Reads rope_theta/rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  if not isinstance(params, dict) or not isinstance(scaling, dict):
    raise CheckpointError(f"{source} rope_scaling/rope_parameters must be JSON objects; got "
                          f"{scaling!r}. Fix the file or re-download it.")
  theta = _positive_float(hf, "rope_theta", params.get("rope_theta", 10_000.0), source)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  number = lambda key: _positive_float(scaling, key, None, source)
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=number("factor"))
  if kind == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=number("factor"), low_freq_factor=number("low_freq_factor"),
        high_freq_factor=number("high_freq_factor"),
        original_max_position=_positive_int(scaling, "original_max_position_embeddings", None,
                                            source))
  raise UnsupportedArchitectureError(
      f"rope scaling type '{kind}' is not supported; jinfer implements 'llama3' and 'linear'.")


class SafetensorsDir:
  """Name -> float32 numpy array over one or several (sharded) safetensors files."""

  def __init__(self, path: Path):
    self._files = _shard_files(path)
    self._handles: dict[Path, Any] = {}
    self._where: dict[str, Path] = {}
    for file in self._files:
      for name in self._open(file).keys():
        self._where[name] = file

  def _open(self, file: Path) -> Any:
    if file not in self._handles:
      try:
        self._handles[file] = safe_open(file, framework="np")
      except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"'{file}' is truncated or corrupt ({e}); re-download it.") from e
    return self._handles[file]

  def __enter__(self) -> "SafetensorsDir":
    return self

  def __exit__(self, *exc: Any) -> None:
    self._handles.clear()

  def __contains__(self, name: str) -> bool:
    return name in self._where

  @property
  def names(self) -> list[str]:
    """Names of every tensor in the directory's safetensors files."""
    return list(self._where)

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` as float32, checked to have `shape` (else CheckpointError)."""
    if name not in self._where:
      raise CheckpointError(
          f"tensor '{name}' is missing from the safetensors files in "
          f"'{self._files[0].parent}'; the checkpoint is incomplete or of another model family.")
    file = self._where[name]
    handle = self._open(file)
    dtype = handle.get_slice(name).get_dtype()
    # numpy has no bfloat16, so safetensors' numpy backend cannot return BF16 tensors.
    value = (_read_bf16(file, name) if dtype == "BF16" else handle.get_tensor(name))
    value = np.asarray(value, dtype=np.float32)
    if value.shape != shape:
      raise CheckpointError(
          f"tensor '{name}' has shape {value.shape}, expected {shape} from config.json; "
          "the checkpoint does not match its config.")
    return value


def _shard_files(path: Path) -> list[Path]:
  index = path / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise CheckpointError(
          f"'{index}' names shards that are missing: {missing}; download the whole directory.")
    if files:
      return files
  if (path / SINGLE_FILE).is_file():
    return [path / SINGLE_FILE]
  files = sorted(path.glob("*.safetensors"))
  if files:
    return files
  raise CheckpointError(
      f"no safetensors weights in '{path}' (expected {SINGLE_FILE} or {INDEX_FILE}). "
      "jinfer does not read pickled .bin/.pt files; re-save with "
      "model.save_pretrained(path) (safetensors is the default).")


def _read_bf16(file: Path, name: str) -> np.ndarray:
  """Reads one BF16 tensor straight from the file layout and widens it exactly to float32."""
  with open(file, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(header_len))[name]
  begin, end = info["data_offsets"]
  raw = np.fromfile(file, dtype="<u2", count=(end - begin) // 2, offset=8 + header_len + begin)
  return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def params_from_hf(tensors: SafetensorsDir, config: LlamaConfig,
                   source: str = "config.json") -> Params:
  """Arranges HF tensors (Linear weights are [out, in]) in jinfer's params layout, checking them
  against `config` (read from `source`)."""
  validation.check_layer_count(tensors.names, "model.layers.", config, source, "num_hidden_layers")
  d, v = config.d_model, config.vocab_size
  params: Params = {
      "embed": tensors.get("model.embed_tokens.weight", (v, d)),
      "final_norm": tensors.get("model.norm.weight", (d,)),
      "layers": [_layer(tensors, config, i) for i in range(config.n_layers)],
  }
  # Tied checkpoints sometimes still store lm_head.weight; the config decides.
  if not config.tie_embeddings:
    params["lm_head"] = tensors.get("lm_head.weight", (v, d))
  validation.check_params(params, config, source)
  return params


def _layer(tensors: SafetensorsDir, config: LlamaConfig, i: int) -> dict[str, np.ndarray]:
  d, n, k, h, f = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                   config.d_ff)
  p = f"model.layers.{i}."
  get = tensors.get
  layer = {
      "attn_norm": get(p + "input_layernorm.weight", (d,)),
      "wq": get(p + "self_attn.q_proj.weight", (n * h, d)).reshape(n, h, d),
      "wk": get(p + "self_attn.k_proj.weight", (k * h, d)).reshape(k, h, d),
      "wv": get(p + "self_attn.v_proj.weight", (k * h, d)).reshape(k, h, d),
      "wo": get(p + "self_attn.o_proj.weight", (d, n * h)).reshape(d, n, h),
      "mlp_norm": get(p + "post_attention_layernorm.weight", (d,)),
      "w_gate": get(p + "mlp.gate_proj.weight", (f, d)),
      "w_up": get(p + "mlp.up_proj.weight", (f, d)),
      "w_down": get(p + "mlp.down_proj.weight", (d, f)),
  }
  if config.qkv_bias:
    layer["bq"] = get(p + "self_attn.q_proj.bias", (n * h,)).reshape(n, h)
    layer["bk"] = get(p + "self_attn.k_proj.bias", (k * h,)).reshape(k, h)
    layer["bv"] = get(p + "self_attn.v_proj.bias", (k * h,)).reshape(k, h)
  return {name: np.ascontiguousarray(w) for name, w in llama.pack_layer(layer).items()}
