"""Sharding over a device mesh with JAX's own machinery: tensor parallelism over attention
heads, MLP width and vocabulary on the `model` axis, data parallelism over batch rows on `data`.

- Logical axis names for every parameter and cache array (`PARAM_AXES`, `cache_specs`) and one
  short rules table mapping them to mesh axes (`RULES`), as t5x and MaxText do.
- `make_mesh({"data": 2, "model": -1})` (one size may be -1: the rest of the devices), or a
  `jax.sharding.Mesh` passed in.
- `shard_params` pads what the model axis does not divide (KV heads, MLP width, vocabulary)
  with zeros, which changes no output, and puts each host array straight into its
  NamedSharding: no device ever holds the whole model.
- `model_call` runs the decoder per shard under `jax.shard_map`: jinfer's native CPU kernels and
  the Pallas kernels see their local shards (an FFI call has no partitioning rule of its own;
  shard_map is its rule), and the row-parallel matmuls (attention output, MLP down) end in an
  all-reduce over `model` (Megatron-LM's layout). Embedding lookups are vocabulary-parallel
  (masked local lookup + all-reduce), logits come out sharded over the vocabulary.

KV heads that the model axis does not divide (SmolLM2: 3 KV heads and 9 query heads against a
model axis of 2, 4 or 8) are padded with zero heads up to the next multiple: zero q/k/v rows
and zero output columns, so a padded head attends uniformly over zero values and adds nothing.
vLLM instead requires tp to divide the query heads (and replicates KV heads when tp exceeds
them); padding runs every mesh, at (K' - K) / K more attention work and KV memory. A sharded
model's config states its padded head counts; `vocab_size` stays the real vocabulary (padded
logits are cut off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jinfer.errors import InvalidRequestError
from jinfer.models.config import LlamaConfig
from jinfer.quant.weights import QuantizedWeight

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (None: replicated).
RULES: Mapping[str, Optional[str]] = {
    "batch": DATA,  # batch rows, engine slots
    "vocab": MODEL,
    "heads": MODEL,  # query heads (grouped by KV head in jinfer's packed layout)
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "length": None,  # cache positions
    "pages": None,
    "head_dim": None,
}

# Logical axes of every parameter, by name, in jinfer's packed [out, in] layout.
PARAM_AXES: Mapping[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "w_qkv": ("kv_heads", "embed"),  # rows: per KV head, its G query heads, its key, its value
    "b_qkv": ("kv_heads",),
    "wo": ("embed", "heads"),
    "w_gate_up": ("mlp", "embed"),  # rows: gate and up interleaved per MLP unit
    "w_down": ("embed", "mlp"),
}

MeshLike = Union[Mesh, Mapping[str, int]]


def make_mesh(mesh: MeshLike) -> Mesh:
  """A ("data", "model") mesh: a Mesh with those axis names as it is, or axis sizes such as
  {"data": 2, "model": 4} with at most one -1 (the devices left); a missing axis has size 1."""
  if isinstance(mesh, Mesh):
    if set(mesh.axis_names) != set(MESH_AXES):
      raise InvalidRequestError(f"mesh axes must be {MESH_AXES}; got {mesh.axis_names}. Build "
                                f"one with jinfer.sharding.make_mesh({{'data': 1, 'model': 4}}).")
    return mesh
  if not isinstance(mesh, Mapping) or set(mesh) - set(MESH_AXES):
    raise InvalidRequestError(f"mesh must be a jax.sharding.Mesh or a dict of sizes with keys "
                              f"{MESH_AXES}, e.g. {{'data': 2, 'model': -1}}; got {mesh!r}.")
  sizes = {axis: mesh.get(axis, 1) for axis in MESH_AXES}
  devices = jax.device_count()
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise InvalidRequestError(f"mesh[{axis!r}] must be a positive int or -1; got {size!r}.")
  if list(sizes.values()).count(-1) > 1:
    raise InvalidRequestError(f"at most one mesh axis may be -1; got {sizes}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  sizes = {a: (devices // known if s == -1 else s) for a, s in sizes.items()}
  needed = math.prod(sizes.values())
  if needed < 1 or needed > devices:
    raise InvalidRequestError(
        f"mesh {sizes} needs {needed} devices; there are {devices} "
        f"({jax.devices()[0].platform}). On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
        f"gives N devices.")
  shape = tuple(int(sizes[a]) for a in MESH_AXES)
  # The first `needed` devices (all of them in a multi-process run, where every process must
  # take part).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:needed])


def spec(*logical: Optional[str]) -> P:
  """The PartitionSpec of an array with these logical axes (None: replicated)."""
  return P(*(RULES.get(a) if a is not None else None for a in logical))


def model_size(mesh: Optional[Mesh]) -> int:
  """Devices along the model (tensor-parallel) axis; 1 without a mesh."""
  return 1 if mesh is None else mesh.shape[MODEL]


def data_size(mesh: Optional[Mesh]) -> int:
  """Devices along the data (batch) axis; 1 without a mesh."""
  return 1 if mesh is None else mesh.shape[DATA]


# ----------------------------------------------------------------------------- parameters


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def padded_config(config: LlamaConfig, mesh: Mesh) -> LlamaConfig:
  """The config a model sharded over `mesh` runs: KV heads (and query heads with them) and MLP
  width rounded up to multiples of the model axis."""
  m = model_size(mesh)
  kv_heads = _round_up(config.n_kv_heads, m)
  return dataclasses.replace(config, n_kv_heads=kv_heads, n_heads=kv_heads * config.group_size,
                             d_ff=_round_up(config.d_ff, m))


def local_config(config: LlamaConfig, mesh: Mesh) -> LlamaConfig:
  """What one model-axis shard of a padded config computes: its share of the heads."""
  m = model_size(mesh)
  return dataclasses.replace(config, n_kv_heads=config.n_kv_heads // m,
                             n_heads=config.n_heads // m, d_ff=config.d_ff // m)


def _leaf_axes(name: str, x: Any) -> Any:
  """Logical axes of a parameter leaf; for a QuantizedWeight, a QuantizedWeight of them (its
  scales and offsets follow the rows, and the columns when they are per group)."""
  axes = PARAM_AXES.get(name)
  if axes is None:
    raise InvalidRequestError(f"parameter {name!r} has no sharding rule; known: "
                              f"{sorted(PARAM_AXES)}.")
  if isinstance(x, QuantizedWeight):
    per_scale = axes if x.scales.ndim == 2 else axes[:1]
    return x.replace(codes=axes, scales=per_scale,
                     offsets=None if x.offsets is None else per_scale)
  return axes


def _map_named(fn: Callable[[str, Any], Any], params: dict) -> dict:
  """fn(name, leaf) over the params tree, keeping QuantizedWeights whole."""
  out = {}
  for name, value in params.items():
    if name == "layers":
      out[name] = [_map_named(fn, layer) for layer in value]
    else:
      out[name] = fn(name, value)
  return out


def param_specs(params: dict) -> dict:
  """PartitionSpecs of a params tree (QuantizedWeight leaves become QuantizedWeights of specs)."""
  def specs(name, x):
    axes = _leaf_axes(name, x)
    if isinstance(x, QuantizedWeight):
      return jax.tree.map(lambda a: spec(*a), axes, is_leaf=lambda a: isinstance(a, tuple))
    return spec(*axes)
  return _map_named(specs, params)


def _pad_axis(x: np.ndarray, axis: int, count: int, new_count: int) -> np.ndarray:
  """Appends zeros to `axis`, which holds `count` equal units (heads, MLP units, vocabulary
  rows), so that it holds `new_count`."""
  size = x.shape[axis]
  new_size = size * new_count / count
  if new_size != int(new_size):
    raise InvalidRequestError(
        f"cannot pad an axis of {size} entries holding {count} units to {new_count} units "
        f"(quantization groups would straddle units); choose a model axis that divides the "
        f"model's heads and MLP width, or load the float weights, shard, then quantize "
        f"(Model.quantize).")
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, int(new_size) - size)
  return np.pad(x, widths)


def shard_params(params: dict, config: LlamaConfig, mesh: Mesh, dtype=None) -> dict:
  """Pads `params` (of `config`, host or device arrays) for `mesh` and places each array in its
  NamedSharding; float arrays are cast to `dtype` on the host first when given."""
  padded = padded_config(config, mesh)
  units = {"kv_heads": (config.n_kv_heads, padded.n_kv_heads),
           "heads": (config.n_kv_heads, padded.n_kv_heads),  # wo's columns, by KV group
           "mlp": (config.d_ff, padded.d_ff)}

  def place(x, axes, cast: bool = True) -> jax.Array:
    x = np.asarray(x)
    if cast and dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(dtype)
    for axis, name in enumerate(axes):
      if name == "vocab":  # rows (padded already if the model was sharded before)
        rows = x.shape[axis]
        x = _pad_axis(x, axis, rows, _round_up(rows, model_size(mesh)))
      elif name in units and units[name][0] != units[name][1]:
        x = _pad_axis(x, axis, *units[name])
      mesh_axis = RULES.get(name)
      if mesh_axis is not None and x.shape[axis] % mesh.shape[mesh_axis]:
        raise InvalidRequestError(
            f"a {x.shape} parameter array cannot be split {mesh.shape[mesh_axis]} ways along "
            f"its {name!r} axis ({x.shape[axis]} entries; quantization groups must not "
            f"straddle shards). Use a model axis that divides it, or a smaller group_size.")
    return jax.device_put(x, NamedSharding(mesh, spec(*axes)))

  def shard(name, x):
    axes = _leaf_axes(name, x)
    if isinstance(x, QuantizedWeight):
      # Quantized weights keep their codes, scales and offsets in their stored dtypes.
      return x.replace(codes=place(x.codes, axes.codes, False),
                       scales=place(x.scales, axes.scales, False),
                       offsets=None if x.offsets is None else place(x.offsets, axes.offsets, False))
    return place(x, axes)
  return _map_named(shard, params)


# ----------------------------------------------------------------------------- running sharded


@contextlib.contextmanager
def use(mesh: Optional[Mesh]):
  """Traces inside it run sharded over `mesh` (the decoder under shard_map); None: unsharded."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh):
    yield


def context_mesh() -> Optional[Mesh]:
  """The mesh a trace runs under (`use`), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
    return None
  return mesh


def cache_specs(cache) -> Any:
  """PartitionSpecs of a KV cache: KV heads over `model`; rows (and their page tables) over
  `data`. A paged pool is shared by all rows, so it is not split over `data`."""
  from jinfer.cache.kv_cache import KVCache  # pylint: disable=g-import-not-at-top
  if cache is None:
    return None
  if isinstance(cache, KVCache):
    heads = spec("batch", "kv_heads")
    return jax.tree.map(lambda _: heads, cache)
  pool, rows = spec("kv_heads"), spec("batch")
  return cache.replace(k_pages=tuple(pool for _ in cache.k_pages),
                       v_pages=tuple(pool for _ in cache.v_pages),
                       k_scales=tuple(pool for _ in cache.k_scales),
                       v_scales=tuple(pool for _ in cache.v_scales),
                       page_tables=rows, lengths=rows,
                       packed_query_starts=None if cache.packed_query_starts is None else spec())


def host_readable(state):
  """Under a mesh: a decoding state's arrays replicated (its KV caches as `cache_specs` lays
  them out), so that every process can read them back (in a multi-process run a process sees only
  its own devices' shards); unchanged otherwise. Every program that returns a state the host
  reads or passes on ends with this, so its layout is also the same from call to call."""
  if context_mesh() is None:
    return state
  return jax.lax.with_sharding_constraint(state, state_specs(state))


def state_specs(state) -> Any:
  """PartitionSpecs of a decoding state: its KV caches by `cache_specs`, the rest replicated."""
  from jinfer.cache.kv_cache import KVCache  # pylint: disable=g-import-not-at-top
  from jinfer.cache.paged_kv_cache import PagedKVCache  # pylint: disable=g-import-not-at-top
  is_cache = lambda x: isinstance(x, (KVCache, PagedKVCache))
  return jax.tree.map(lambda x: cache_specs(x) if is_cache(x) else P(), state, is_leaf=is_cache)


def round_up_rows(rows: int, mesh: Optional[Mesh]) -> int:
  """`rows` rounded up to a multiple of the data axis: every data shard gets whole rows."""
  return _round_up(rows, data_size(mesh))


def all_reduce(x: jax.Array, sharded: bool) -> jax.Array:
  """Sums the partial results of a row-parallel matmul over the model axis (when sharded)."""
  return jax.lax.psum(x, MODEL) if sharded else x


def shard_index() -> jax.Array:
  """This shard's index along the model axis (inside `model_call`)."""
  return jax.lax.axis_index(MODEL)


def model_call(fn: Callable, mesh: Mesh, args: tuple, in_specs: tuple, out_specs: Any):
  """fn(*args) per shard of `mesh` (jax.shard_map; check_vma off, as Pallas calls need)."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)
