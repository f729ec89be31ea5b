"""`Model` (config + params + tokenizer) and `load_model`, the entry point for every checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer import sharding, validation
from jinfer.errors import InvalidRequestError
from jinfer.validation import check_request
from jinfer.models import llama
from jinfer.models.config import LlamaConfig
from jinfer.quant import weights as quant_weights

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("xla", "pallas")
KV_CACHE_DTYPES = ("auto", "int8")


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: config, params (sharded over `mesh` if set), tokenizer and decode settings."""

  config: LlamaConfig
  params: dict[str, Any]
  tokenizer: Any  # jinfer.tokenizers.Tokenizer
  # How generate attends while decoding: "xla" (contiguous KV cache, XLA math) or "pallas"
  # (paged KV cache, Pallas paged-attention kernel; interpret mode on CPU, slow).
  attention_impl: str = "xla"
  # What the KV cache stores: "auto" (the model's dtype) or "int8" (per-token, per-head scales).
  kv_cache_dtype: str = "auto"
  page_size: int = 16  # tokens per KV page (attention_impl="pallas")
  # The ("data", "model") mesh the params are sharded over (`shard`), or None: one device.
  mesh: Optional[jax.sharding.Mesh] = None

  def __post_init__(self):
    validation.one_of("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    validation.one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
    validation.integer("page_size", self.page_size, low=1)

  def shard(self, mesh: sharding.MeshLike) -> "Model":
    """This model with its params sharded over `mesh` (a Mesh, or sizes such as
    {"data": 2, "model": -1}): tensor parallel over `model`, data parallel over `data`. Heads
    and MLP units the model axis does not divide are padded with zeros (see jinfer.sharding),
    so `config` then states the padded counts. The same mesh again returns this model."""
    mesh = sharding.make_mesh(mesh)
    if mesh == self.mesh:
      return self
    params = sharding.shard_params(self.params, self.config, mesh)
    return dataclasses.replace(self, config=sharding.padded_config(self.config, mesh),
                               params=params, mesh=mesh)

  @property
  def dtype(self):
    """The compute dtype (activations, and the KV cache unless kv_cache_dtype says otherwise)."""
    return self.params["final_norm"].dtype

  @property
  def cache_dtype(self):
    """The dtype KV caches are created with: int8 means quantized with scales."""
    return jnp.int8 if self.kv_cache_dtype == "int8" else self.dtype

  def logits(self, token_ids_BxT) -> jax.Array:
    """Float32 logits [B, T, V] of a full forward pass over token ids (no cache): rows of equal
    length, at most the model's context, of ids in its vocabulary."""
    tokens_BxT = validation.token_matrix("token_ids", token_ids_BxT, self.config.vocab_size,
                                         self.config.max_seq_len)
    rows = len(tokens_BxT)
    check_request(rows % sharding.data_size(self.mesh) == 0,
                  f"token_ids has {rows} rows; on this mesh (data axis "
                  f"{sharding.data_size(self.mesh)}) give a multiple of the data axis.")
    with sharding.use(self.mesh):
      return _full_forward(self.params, jnp.asarray(tokens_BxT), config=self.config)

  @property
  def quantization(self) -> Optional[dict[str, Any]]:
    """None for float weights, else {'mode', 'group_size', 'embeddings'}."""
    return quant_weights.describe(self.params)

  def quantize(self, mode: str, *, group_size: Optional[int] = None,
               embeddings: bool = False) -> "Model":
    """This model with its projections quantized ('int8', 'w8a8' or 'int4'; see
    jinfer.quant.weights)."""
    params = quant_weights.quantize_params(self.params, mode, group_size=group_size,
                                           embeddings=embeddings)
    if self.mesh is not None:  # codes and scales sharded as their weight was
      params = sharding.shard_params(params, self.config, self.mesh)
    return dataclasses.replace(self, params=params)

  def save(self, path, *, overwrite: bool = False) -> None:
    """Writes an Orbax checkpoint that `load_model(path)` restores without re-converting.

    overwrite: replace an existing jinfer checkpoint at `path`; the old one stays until the new
    one is completely written. Anything else at `path` is never replaced.
    """
    from jinfer.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top
    orbax_io.save(path, self.config, self.params, self.tokenizer, overwrite=overwrite)


@functools.partial(jax.jit, static_argnames=("config",))
def _full_forward(params, tokens_BxT, *, config):
  positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  return llama.forward(params, config, tokens_BxT, positions)[0]


def random_model(preset: str = "tiny-gqa", *, seed: int = 0, dtype="float32") -> Model:
  """A model of a preset config (`jinfer.models.config.PRESETS`) with random weights and a byte
  tokenizer: for tests, smoke runs and notebooks, where real weights add nothing."""
  from jinfer.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from jinfer.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top
  validation.one_of("preset", preset, tuple(config_lib.PRESETS))
  validation.integer("seed", seed)
  config = config_lib.PRESETS[preset]
  params = llama.init_params(config, jax.random.key(seed), resolve_dtype(dtype))
  return Model(config=config, params=params, tokenizer=ByteTokenizer())


def resolve_dtype(dtype) -> Any:
  """The jnp dtype of 'float32' or 'bfloat16' (or of jnp.float32 / jnp.bfloat16 themselves)."""
  try:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in _DTYPES:
    raise InvalidRequestError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def cast_params(params, dtype) -> dict[str, Any]:
  """Moves params to the default device in `dtype` (float weights only: quantized weights keep
  their codes, scales and offsets as they are)."""
  def cast(x):
    if isinstance(x, quant_weights.QuantizedWeight):
      return jax.tree.map(jnp.asarray, x)
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x)
  return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, quant_weights.QuantizedWeight))


def resolve_attention_impl(attention_impl: str, config: Optional[LlamaConfig] = None,
                           page_size: int = 16, kv_cache_dtype: str = "auto") -> str:
  """"xla" or "pallas"; "auto" is "pallas" on TPU/GPU when the compiled kernels take the model's
  head dim and `page_size` (TPU: head dim a multiple of 128, pages a multiple of 16, or 32 for
  int8 KV; GPU: both powers of two, head dim >= 16), else "xla" (CPU: no interpreted kernels)."""
  validation.one_of("attention_impl", attention_impl, ("auto", *ATTENTION_IMPLS))
  if attention_impl != "auto":
    return attention_impl
  platform = jax.default_backend()
  if platform not in ("tpu", "gpu") or config is None:
    return "xla"
  h = config.head_dim
  if platform == "tpu":
    fits = h % 128 == 0 and page_size % (32 if kv_cache_dtype == "int8" else 16) == 0
  else:
    fits = h >= 16 and not h & (h - 1) and page_size >= 1 and not page_size & (page_size - 1)
  return "pallas" if fits else "xla"


def load_model(name_or_path: str = "smollm2-135m-instruct", *, dtype="float32",
               attention_impl: str = "xla", kv_cache_dtype: str = "auto",
               page_size: int = 16, quantize: Optional[str] = None,
               mesh: Optional[sharding.MeshLike] = None) -> Model:
  """Loads a registry name, a .gguf file, a Hugging Face directory or a jinfer Orbax checkpoint.

  Weights are dequantized/converted to `dtype` ('float32' or 'bfloat16'). `attention_impl`
  ('xla', 'pallas' or 'auto') sets how generate decodes (see `Model.attention_impl`);
  `kv_cache_dtype` ('auto' or 'int8') and `page_size` set the KV cache it decodes through.
  `quantize` ('int8': per-channel int8 weights, 'w8a8': int8 weights and activations, 'int4':
  group-wise int4 weights) quantizes the projections after loading; a GGUF file's Q4_0/Q4_1
  blocks (int4) and Q8_0 blocks (int8) are kept as they are instead, in groups of 32. A
  checkpoint saved quantized loads quantized as it was saved.
  `mesh` (a jax Mesh with axes ("data", "model"), or sizes such as {"data": 1, "model": -1})
  shards the model as it loads: each host array goes straight into its shards.
  """
  from jinfer.checkpoints import gguf_loader, hf_loader, orbax_io, registry  # pylint: disable=g-import-not-at-top
  # Every argument is checked before the (slow) load.
  check_request(isinstance(name_or_path, (str, os.PathLike)),
                f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}.")
  dtype = resolve_dtype(dtype)
  validation.one_of("attention_impl", attention_impl, ("auto", *ATTENTION_IMPLS))
  validation.one_of("quantize", quantize, (None, *quant_weights.MODES))
  validation.one_of("kv_cache_dtype", kv_cache_dtype, KV_CACHE_DTYPES)
  validation.integer("page_size", page_size, low=1)
  mesh = None if mesh is None else sharding.make_mesh(mesh)
  kind, path = registry.resolve(os.fspath(name_or_path))
  if kind == "gguf":  # quantized straight from the file's blocks where their format allows
    config, params, tokenizer = gguf_loader.load_gguf(path, quantize=quantize)
  else:
    config, params, tokenizer = {"hf": hf_loader.load_hf_dir, "orbax": orbax_io.load}[kind](path)
  stored = quant_weights.describe(params)
  if stored is not None and quantize is not None and stored["mode"] != quantize:
    raise InvalidRequestError(
        f"'{name_or_path}' holds {stored['mode']} weights; it cannot be re-quantized to "
        f"{quantize!r}. Load the float checkpoint, or pass quantize=None.")
  settings = dict(tokenizer=tokenizer,
                  attention_impl=resolve_attention_impl(attention_impl, config, page_size,
                                                        kv_cache_dtype),
                  kv_cache_dtype=kv_cache_dtype, page_size=page_size)
  if mesh is None:
    model = Model(config=config, params=cast_params(params, dtype), **settings)
  else:  # straight into shards: no device ever holds the whole model
    model = Model(config=sharding.padded_config(config, mesh),
                  params=sharding.shard_params(params, config, mesh, dtype), mesh=mesh, **settings)
  if quantize is not None and stored is None:
    model = model.quantize(quantize)  # on a mesh: where the shards lie, re-placed via the host
  return model
