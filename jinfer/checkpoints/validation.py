"""Checks that a checkpoint's params have the structure and shapes its config implies.

Every loader (Orbax, Hugging Face, GGUF) runs `check_params` before handing params to the model,
so an edited or mismatched config is reported by name here instead of failing inside JAX (or,
worse, running with weights it silently misreads).
"""

from __future__ import annotations

from typing import Any, Sequence

from jinfer.errors import CheckpointError
from jinfer.models.config import LlamaConfig
from jinfer.quant.weights import QuantizedWeight

Params = dict[str, Any]
Shape = tuple[int, ...]

# The config fields each param's shape follows from, for error messages.
_SHAPE_FIELDS = {
    "embed": ("vocab_size", "d_model"),
    "lm_head": ("vocab_size", "d_model"),
    "final_norm": ("d_model",),
    "attn_norm": ("d_model",),
    "mlp_norm": ("d_model",),
    "w_qkv": ("n_heads", "n_kv_heads", "head_dim", "d_model"),
    "b_qkv": ("n_heads", "n_kv_heads", "head_dim"),
    "wo": ("d_model", "n_heads", "head_dim"),
    "w_gate_up": ("d_ff", "d_model"),
    "w_down": ("d_model", "d_ff"),
}


def expected_layer_shapes(config: LlamaConfig) -> dict[str, Shape]:
  """Shapes of one layer as `llama.init_params` / `llama.pack_layer` lay it out.

  Written out rather than taken from jax.eval_shape(init_params): init_params packs layers with
  numpy (pack_layer), which cannot be traced. tests/test_checkpoints.py pins the two together.
  """
  d, n, k, h, f = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                   config.d_ff)
  qkv_rows = k * (config.group_size + 2) * h  # per KV head: its query heads, its key, its value
  shapes = {"attn_norm": (d,), "mlp_norm": (d,), "w_qkv": (qkv_rows, d), "wo": (d, n * h),
            "w_gate_up": (2 * f, d), "w_down": (d, f)}
  if config.qkv_bias:
    shapes["b_qkv"] = (qkv_rows,)
  return shapes


def expected_shapes(config: LlamaConfig) -> Params:
  """The params tree of `llama.init_params(config, key)` with each array replaced by its shape."""
  v, d = config.vocab_size, config.d_model
  layer = expected_layer_shapes(config)
  shapes: Params = {"embed": (v, d), "final_norm": (d,),
                    "layers": [dict(layer) for _ in range(config.n_layers)]}
  if not config.tie_embeddings:
    shapes["lm_head"] = (v, d)
  return shapes


def check_params(params: Params, config: LlamaConfig, source: str) -> None:
  """Raises CheckpointError naming the first param that is missing, unexpected or of another
  shape than `config` implies. `source` names the file the config came from (for the fix).

  Quantized weights are compared by their logical [out, in] shape; their scales must match it.
  """
  expected = expected_shapes(config)
  fix = (f"The config in {source} does not describe these weights: restore its original values, "
         "or re-save / re-convert the checkpoint.")
  if not isinstance(params, dict):
    raise CheckpointError(f"params from {source} are a {type(params).__name__}, expected a dict "
                          f"with {sorted(expected)}. {fix}")
  _check_keys(params, expected, "", fix)
  layers = params["layers"]
  if not isinstance(layers, (list, tuple)) or len(layers) != config.n_layers:
    count = len(layers) if isinstance(layers, (list, tuple)) else type(layers).__name__
    raise CheckpointError(f"params hold {count} layers, but n_layers={config.n_layers}. {fix}")
  for name in ("embed", "final_norm"):
    _check_leaf(params[name], expected[name], name, config, fix)
  for i, (layer, layer_shapes) in enumerate(zip(layers, expected["layers"])):
    if not isinstance(layer, dict):
      raise CheckpointError(f"param 'layers.{i}' is a {type(layer).__name__}, expected a dict "
                            f"of {sorted(layer_shapes)}. {fix}")
    _check_keys(layer, layer_shapes, f"layers.{i}.", fix)
    for name, shape in layer_shapes.items():
      _check_leaf(layer[name], shape, f"layers.{i}.{name}", config, fix)
  if "lm_head" in expected:
    _check_leaf(params["lm_head"], expected["lm_head"], "lm_head", config, fix)


def _check_keys(actual: dict, expected: dict, prefix: str, fix: str) -> None:
  missing = [name for name in expected if name not in actual]
  extra = sorted(str(name) for name in actual if name not in expected)
  if missing:
    why = {"lm_head": " (tie_embeddings=False needs a separate LM head)",
           "b_qkv": " (qkv_bias=True needs q/k/v biases)"}.get(missing[0], "")
    raise CheckpointError(f"param '{prefix}{missing[0]}' is missing{why}. {fix}")
  if extra:
    why = {"lm_head": " (tie_embeddings=True shares the embedding table instead)",
           "b_qkv": " (qkv_bias=False)"}.get(extra[0], "")
    raise CheckpointError(f"param '{prefix}{extra[0]}' is not part of the model the config "
                          f"describes{why}. {fix}")


def _check_leaf(leaf: Any, shape: Shape, name: str, config: LlamaConfig, fix: str) -> None:
  short = name.rsplit(".", 1)[-1]
  fields = ", ".join(f"{f}={getattr(config, f)}" for f in _SHAPE_FIELDS.get(short, ()))
  implied = f"the config ({fields}) implies" if fields else "the config implies"
  if isinstance(leaf, QuantizedWeight):
    actual = _quantized_shape(leaf, name, fix)
  elif hasattr(leaf, "shape"):
    actual = tuple(int(n) for n in leaf.shape)
  else:
    raise CheckpointError(f"param '{name}' is a {type(leaf).__name__}, not an array; "
                          f"{implied} shape {shape}. {fix}")
  if actual != tuple(shape):
    raise CheckpointError(f"param '{name}' has shape {actual}, but {implied} {tuple(shape)}. "
                          f"{fix}")


def _quantized_shape(w: QuantizedWeight, name: str, fix: str) -> Shape:
  """The logical [out, in] shape of quantized codes, after checking scales/offsets agree."""
  codes, scales = w.codes, w.scales
  if len(codes.shape) != 2 or len(scales.shape) not in (1, 2):
    raise CheckpointError(f"quantized param '{name}' has codes {tuple(codes.shape)} and scales "
                          f"{tuple(scales.shape)}; expected 2-D codes and 1-D or 2-D scales. "
                          f"{fix}")
  out_features, in_features = w.shape
  groups_ok = len(scales.shape) == 1 or (scales.shape[1] >= 1
                                         and in_features % scales.shape[1] == 0)
  offsets_ok = w.offsets is None or tuple(w.offsets.shape) == tuple(scales.shape)
  if scales.shape[0] != out_features or not groups_ok or not offsets_ok:
    raise CheckpointError(
        f"quantized param '{name}' has scales {tuple(scales.shape)}"
        f"{'' if w.offsets is None else f' and offsets {tuple(w.offsets.shape)}'} that do not "
        f"fit its [{out_features}, {in_features}] codes. {fix}")
  return out_features, in_features


def layer_indices(names: Sequence[str], prefix: str) -> set[int]:
  """Layer numbers i of tensor names '{prefix}{i}.…' (e.g. 'blk.', 'model.layers.')."""
  indices = set()
  for name in names:
    if name.startswith(prefix):
      head = name[len(prefix):].split(".", 1)[0]
      if head.isdigit():
        indices.add(int(head))
  return indices


def check_layer_count(names: Sequence[str], prefix: str, config: LlamaConfig, source: str,
                      field: str) -> None:
  """Refuses files holding layers past the config's n_layers (they would be silently dropped)."""
  beyond = sorted(i for i in layer_indices(names, prefix) if i >= config.n_layers)
  if beyond:
    raise CheckpointError(
        f"{source} sets {field}={config.n_layers}, but the file also holds tensors of layer "
        f"{beyond[0]} ('{prefix}{beyond[0]}.*', {max(beyond) + 1} layers in all); loading would "
        f"silently drop them. Set {field} to the file's layer count, or re-convert the model.")
