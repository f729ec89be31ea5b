"""int8 and int4 weight quantization of the [out, in] projection matrices.

Formats (`QuantizedWeight.bits`):
- int8: symmetric, w ~= q * scale with q in [-127, 127]; one scale per output channel (row), or
  per group of `group_size` inputs of a row. Per-channel scales factor out of the dot product,
  so they are applied once after accumulation (the Pallas int8 matmul does exactly that).
- w8a8: int8 weights as above, and activations quantized per token (symmetric int8) when they
  enter each matmul, so the product runs int8 x int8 -> int32 on int8 tensor units (TPU MXU,
  GPU tensor cores).
- int4: asymmetric per group (default 32 inputs), w ~= q * scale + offset with q in [0, 15],
  two codes per byte (even input in the low nibble). The offset (the group's minimum) keeps
  groups whose values are not centred on zero at full resolution: it is the layout of
  GGUF's Q4_1 and of AWQ/GPTQ's zero points. Scales and offsets are float16, as Q4_1's: 5 bits
  per weight at groups of 32 (float32 ones made it 6), and a Q4_1 tensor maps onto it exactly.

Only the matrices that carry the FLOPs and bytes are quantized (per layer w_qkv, wo, w_gate_up,
w_down); norms stay in the model dtype. The embedding table (which is also the LM head when
tied) and an untied lm_head are quantized to int8 per row when asked: a row gather of the
table dequantizes just the looked-up rows.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from jinfer import cpu_kernels
from jinfer.errors import InvalidRequestError
from jinfer.models.fusion import MatmulFusion

Params = dict[str, Any]
MODES = ("int8", "w8a8", "int4")
PROJECTIONS = ("w_qkv", "wo", "w_gate_up", "w_down")
EMBEDDINGS = ("embed", "lm_head")
INT4_GROUP_SIZE = 32


@flax.struct.dataclass
class QuantizedWeight:
  """An [O, I] weight as integer codes with scales (and offsets for int4): float32 for int8,
  float16 for int4."""

  codes: jax.Array  # int8 [O, I] (int8) or uint8 [O, I // 2] (int4, two codes per byte)
  scales: jax.Array  # [O] (int8 per channel) or [O, I // group_size]
  offsets: Optional[jax.Array] = None  # int4 only: [O, I // group_size]
  bits: int = flax.struct.field(pytree_node=False, default=8)
  # w8a8: quantize the activations per token too (int8 x int8 matmuls).
  int8_activations: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def mode(self) -> str:
    """The quantize mode: 'int8', 'w8a8' or 'int4'."""
    return "w8a8" if self.int8_activations else f"int{self.bits}"

  @property
  def shape(self) -> tuple[int, int]:
    """(out, in) of the float weight it stands for (int4 codes pack two per byte)."""
    out_features, stored = self.codes.shape
    return out_features, stored * (8 // self.bits)

  @property
  def group_size(self) -> Optional[int]:
    """Inputs per scale, or None for one scale per output channel."""
    return None if self.scales.ndim == 1 else self.shape[1] // self.scales.shape[1]

  @property
  def nbytes(self) -> int:
    """Bytes of its codes, scales and offsets."""
    return param_bytes(self)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float [O, I] weight these codes stand for."""
    out_features, in_features = self.shape
    if self.group_size is None:
      return (self.codes.astype(jnp.float32) * self.scales[:, None]).astype(dtype)
    codes_OxGxS = _unpack_int4(self.codes) if self.bits == 4 else self.codes
    codes_OxGxS = codes_OxGxS.astype(jnp.float32).reshape(out_features, -1, self.group_size)
    w_OxGxS = codes_OxGxS * self.scales[..., None].astype(jnp.float32)
    if self.offsets is not None:
      w_OxGxS = w_OxGxS + self.offsets[..., None].astype(jnp.float32)
    return w_OxGxS.reshape(out_features, in_features).astype(dtype)


def quantize_int8(w_OxI: jax.Array, group_size: Optional[int] = None) -> QuantizedWeight:
  """Symmetric int8 codes, one scale per row (or per `group_size` inputs of a row)."""
  w = jnp.asarray(w_OxI, jnp.float32)
  out_features, in_features = w.shape
  if group_size is None:
    scales_O = _safe_scale(jnp.max(jnp.abs(w), axis=1) / 127)
    codes = jnp.round(w / scales_O[:, None])
    return QuantizedWeight(codes.astype(jnp.int8), scales_O, bits=8)
  w_OxGxS = _groups(w, group_size)
  scales_OxG = _safe_scale(jnp.max(jnp.abs(w_OxGxS), axis=2) / 127)
  codes = jnp.round(w_OxGxS / scales_OxG[..., None]).reshape(out_features, in_features)
  return QuantizedWeight(codes.astype(jnp.int8), scales_OxG, bits=8)


def quantize_int4(w_OxI: jax.Array, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
  """Asymmetric 4-bit codes per group of `group_size` inputs, packed two per byte, with
  float16 scales and offsets. The codes are rounded against the float16 values stored, so the
  rounding of the scale costs no extra error beyond its own."""
  w = jnp.asarray(w_OxI, jnp.float32)
  out_features, in_features = w.shape
  if group_size % 2:
    raise InvalidRequestError(f"int4 group_size must be even (codes pack in pairs); got "
                              f"{group_size}.")
  w_OxGxS = _groups(w, group_size)
  low_OxG = jnp.min(w_OxGxS, axis=2).astype(jnp.float16)
  high_OxG = jnp.max(w_OxGxS, axis=2)
  scales_OxG = ((high_OxG - low_OxG.astype(jnp.float32)) / 15).astype(jnp.float16)
  scales_OxG = jnp.where(scales_OxG > 0, scales_OxG, jnp.float16(1))  # all-equal groups
  codes = jnp.round((w_OxGxS - low_OxG[..., None].astype(jnp.float32))
                    / scales_OxG[..., None].astype(jnp.float32))
  codes_OxI = jnp.clip(codes, 0, 15).astype(jnp.uint8).reshape(out_features, in_features)
  return QuantizedWeight(pack_int4(codes_OxI), scales_OxG, low_OxG, bits=4)


def pack_int4(codes_OxI: jax.Array) -> jax.Array:
  """Codes in [0, 15] [O, I] -> uint8 [O, I // 2], input 2j in the low nibble, 2j + 1 high."""
  codes_OxI = codes_OxI.astype(jnp.uint8)
  return codes_OxI[:, 0::2] | (codes_OxI[:, 1::2] << 4)


def quantize(w_OxI: jax.Array, mode: str, group_size: Optional[int] = None) -> QuantizedWeight:
  """w_OxI quantized in `mode` ('int8', 'w8a8' or 'int4'); group_size None: per channel for
  int8, INT4_GROUP_SIZE for int4."""
  if mode == "int8":
    return quantize_int8(w_OxI, group_size)
  if mode == "w8a8":
    return quantize_int8(w_OxI, group_size).replace(int8_activations=True)
  if mode == "int4":
    return quantize_int4(w_OxI, group_size or INT4_GROUP_SIZE)
  raise InvalidRequestError(f"quantize mode {mode!r} is not supported; use one of {list(MODES)}.")


def quantize_params(params: Params, mode: str, *, group_size: Optional[int] = None,
                    embeddings: bool = False) -> Params:
  """Params with each layer's projections quantized to `mode` ('int8' or 'int4').

  group_size: inputs per scale (int8 default: per channel; int4 default: 32).
  embeddings: also quantize the embedding table / lm_head (int8, one scale per row).
  """
  if mode not in MODES:
    raise InvalidRequestError(f"quantize mode {mode!r} is not supported; use one of "
                              f"{list(MODES)}.")
  if is_quantized(params):
    raise InvalidRequestError("these params are already quantized; quantize float params.")
  quantize_one = jax.jit(quantize, static_argnames=("mode", "group_size"))
  layers = []
  for index, layer in enumerate(params["layers"]):
    layer = dict(layer)
    for name in PROJECTIONS:
      layer[name] = quantize_one(layer[name], mode, group_size)
      _check_finite(layer[name], f"layers[{index}].{name}")
    layers.append(layer)
  params = dict(params, layers=layers)
  if embeddings:
    for name in EMBEDDINGS:
      if name in params:
        params[name] = jax.jit(quantize_int8)(params[name])
  return params


def _check_finite(w: QuantizedWeight, name: str) -> None:
  """int4's float16 offsets and scales overflow when a group's minimum is below -65504 or its
  range above 15 x 65504: refuse rather than run NaN."""
  stored = [w.scales] + ([] if w.offsets is None else [w.offsets])
  if not all(bool(jnp.isfinite(x).all()) for x in stored):
    raise InvalidRequestError(
        f"{name}: its {w.mode} scales or offsets are not finite (weights beyond float16's "
        f"range, or non-finite weights); quantize it to int8 instead.")


def dequantize_params(params: Params, dtype=jnp.float32) -> Params:
  """Params with every QuantizedWeight replaced by its float weight."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QuantizedWeight) else x,
                      params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def is_quantized(params: Params) -> bool:
  """Whether any weight of `params` is a QuantizedWeight."""
  return any(isinstance(x, QuantizedWeight) for x in _weights(params))


def describe(params: Params) -> Optional[dict[str, Any]]:
  """{'mode', 'group_size', 'embeddings'} of quantized params (None for float params): what a
  checkpoint records to rebuild them (`restore`)."""
  layers = params.get("layers") or [{}]
  w = layers[0].get("w_qkv")
  if not isinstance(w, QuantizedWeight):
    return None
  return {"mode": w.mode, "group_size": w.group_size,
          "embeddings": isinstance(params.get("embed"), QuantizedWeight)}


def to_plain(params: Params) -> Params:
  """Params with each QuantizedWeight as a plain dict of its arrays (what checkpoints store)."""
  def plain(x):
    if not isinstance(x, QuantizedWeight):
      return x
    d = {"codes": x.codes, "scales": x.scales}
    return d if x.offsets is None else dict(d, offsets=x.offsets)
  return jax.tree.map(plain, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def restore(params: Params, description: Optional[dict[str, Any]]) -> Params:
  """Rebuilds QuantizedWeights from the plain dicts a checkpoint stores (inverse of saving
  `jax.tree` state dicts), following `describe`'s record."""
  if description is None:
    return params
  mode = description["mode"]

  def rebuild(d):
    # (int4 checkpoints written before scales became float16 keep float32 ones: the CPU
    # kernel rounds them to float16 at each call, the XLA path reads them as they are.)
    return QuantizedWeight(d["codes"], d["scales"], d.get("offsets"),
                           bits=4 if mode == "int4" else 8, int8_activations=mode == "w8a8")

  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for name in PROJECTIONS:
      layer[name] = rebuild(layer[name])
    layers.append(layer)
  params = dict(params, layers=layers)
  if description.get("embeddings"):
    for name in EMBEDDINGS:
      if name in params:
        params[name] = QuantizedWeight(params[name]["codes"], params[name]["scales"], bits=8)
  return params


def param_bytes(params: Params) -> int:
  """Bytes the params occupy, codes and scales included."""
  return int(sum(x.nbytes for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- used by the model


def linear(x_BxTxI: jax.Array, w: QuantizedWeight,
           fusion: Optional[MatmulFusion] = None) -> jax.Array:
  """x @ w.T for a quantized [out, in] weight -> [B, T, O] in x's dtype, with `fusion`
  (norm / SwiGLU before, residual after) around it.

  At decode shapes on CPU every format runs in jinfer's native CPU kernels (`cpu_kernels`).
  Otherwise int8 and w8a8 go through the int8 matmuls (Pallas kernels on TPU/GPU, their XLA
  references elsewhere) and int4 is dequantized in the jitted program, a nibble plane at a time.
  """
  fusion = fusion or MatmulFusion()
  from pallas_kernels import int8_matmul  # pylint: disable=g-import-not-at-top
  if w.bits == 4:
    matmul = _int4_linear
  else:
    int8 = int8_matmul.int8_matmul_w8a8 if w.int8_activations else int8_matmul.int8_matmul
    matmul = lambda x, w: int8(x, w.codes, w.scales)

  def fallback():
    # Tie the weight to the activations: otherwise XLA hoists the dequantization out of decode
    # loops (the weights are loop-invariant) and keeps a float copy of every weight alive while
    # decoding, so the model would run from float weights and save no memory. (The CPU
    # kernels read the codes as they are; the barrier would cost them a copy of x.)
    x_barred, w_barred = jax.lax.optimization_barrier((x_BxTxI, w))
    return fusion.apply(x_barred, lambda x: matmul(x, w_barred))

  if w.bits == 4:
    return cpu_kernels.int4_matmul(x_BxTxI, w.codes, w.scales, w.offsets, fallback=fallback,
                                   fusion=fusion)
  return cpu_kernels.int8_matmul(x_BxTxI, w.codes, w.scales, fallback=fallback,
                                 quantize_activations=w.int8_activations, fusion=fusion)


def _int4_linear(x_BxTxI: jax.Array, w: QuantizedWeight) -> jax.Array:
  """Even inputs against the low nibbles, odd inputs against the high nibbles.

  Dequantizing each nibble plane in place of unpacking to [O, I] first halves the work XLA:CPU
  does per weight (measured 2x at SmolLM2's decode shapes).
  """
  dtype = x_BxTxI.dtype
  scales_OxJ = jnp.repeat(w.scales.astype(jnp.float32), w.group_size // 2, axis=1)
  offsets_OxJ = jnp.repeat(w.offsets.astype(jnp.float32), w.group_size // 2, axis=1)
  y = 0
  for parity, plane_OxJ in enumerate((w.codes & 0xF, w.codes >> 4)):
    w_OxJ = (plane_OxJ.astype(jnp.float32) * scales_OxJ + offsets_OxJ).astype(dtype)
    y = y + jnp.einsum("BTJ,OJ->BTO", x_BxTxI[..., parity::2], w_OxJ)
  return y


def embed(table, tokens_BxT: jax.Array, dtype) -> jax.Array:
  """Rows of the embedding table [V, D] (float or int8-quantized) -> [B, T, D]."""
  if isinstance(table, QuantizedWeight):
    rows = table.codes[tokens_BxT].astype(jnp.float32) * table.scales[tokens_BxT][..., None]
    return rows.astype(dtype)
  return table[tokens_BxT]


def _groups(w_OxI: jax.Array, group_size: int) -> jax.Array:
  out_features, in_features = w_OxI.shape
  if group_size < 1 or in_features % group_size:
    raise InvalidRequestError(
        f"group_size {group_size} does not divide the {in_features} inputs of a "
        f"[{out_features}, {in_features}] weight; pick a divisor of {in_features}.")
  return w_OxI.reshape(out_features, in_features // group_size, group_size)


def _safe_scale(scale: jax.Array) -> jax.Array:
  """All-zero rows/groups get scale 1 (their codes are 0), never a division by zero."""
  return jnp.where(scale > 0, scale, 1.0)


def _unpack_int4(packed_OxJ: jax.Array) -> jax.Array:
  """uint8 [O, I // 2] -> codes [O, I] (low nibble first)."""
  low, high = packed_OxJ & 0xF, packed_OxJ >> 4
  return jnp.stack([low, high], axis=-1).reshape(packed_OxJ.shape[0], -1)


def _weights(params: Params):
  return jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
