"""Functional Llama-family decoder: `forward(params, tokens, positions, cache) -> (logits, cache)`.

Parameters live in a plain pytree (see `init_params` for the layout) and are never stored in
modules. Letters in einsums: B batch, T new tokens, S cached positions, D model width, N query
heads, K KV heads, G query heads per KV head, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jinfer import cpu_kernels, sharding
from jinfer.cache.kv_cache import KVCache
from jinfer.cache.paged_kv_cache import PagedKVCache
from jinfer.models.attention import attention
from jinfer.models.config import LlamaConfig
from jinfer.models.fusion import MatmulFusion, rms_norm
from jinfer.models.rope import Rope, rope_inverse_frequencies
from jinfer.quant import weights as quant_weights

Params = dict[str, Any]
Cache = Union[KVCache, PagedKVCache]  # anything with write_and_attend(layer, qkv, rope, positions)


def pack_layer(layer: dict[str, Any]) -> dict[str, Any]:
  """Fuses a layer's separate projections into jinfer's layout (numpy in, numpy out).

  In:  wq [N, H, D], wk/wv [K, H, D], wo [D, N, H], w_gate/w_up [F, D], w_down [D, F],
       optional bq [N, H], bk/bv [K, H] (Hugging Face's [out, in] orientation).
  Out: 2-D [out, in] matrices, measured fastest for XLA:CPU's decode-time matrix-vector
       products (1.25x over [in, out]; N-D weights get transposed in memory on every call):
       w_qkv [K*(G+2)*H, D]  rows grouped by KV head: its G query heads, its key, its value;
       w_gate_up [F*2, D]    gate and up rows interleaved;
       wo [D, N*H], w_down [D, F].
  One matmul for q/k/v and one for gate/up instead of five, and the groupings keep both
  shardable along their rows (by KV head, by F).
  """
  layer = dict(layer)
  wq, wk, wv = (np.asarray(layer.pop(name)) for name in ("wq", "wk", "wv"))
  kv_heads, h, d = wk.shape
  w_qkv = np.concatenate([wq.reshape(kv_heads, -1, h, d), wk[:, None], wv[:, None]], axis=1)
  layer["w_qkv"] = w_qkv.reshape(-1, d)
  if "bq" in layer:
    bq, bk, bv = (np.asarray(layer.pop(name)) for name in ("bq", "bk", "bv"))
    layer["b_qkv"] = np.concatenate(
        [bq.reshape(kv_heads, -1, h), bk[:, None], bv[:, None]], axis=1).reshape(-1)
  gate_up = np.stack([np.asarray(layer.pop("w_gate")), np.asarray(layer.pop("w_up"))], axis=1)
  layer["w_gate_up"] = gate_up.reshape(-1, d)
  wo = np.asarray(layer["wo"])
  layer["wo"] = wo.reshape(wo.shape[0], -1)
  return layer


def unpack_layer(layer: dict[str, Any], config: LlamaConfig) -> dict[str, Any]:
  """The inverse of `pack_layer` (for tests and for exporting to other layouts)."""
  layer = dict(layer)
  k, g, h, d = config.n_kv_heads, config.group_size, config.head_dim, config.d_model
  w_qkv = np.asarray(layer.pop("w_qkv")).reshape(k, g + 2, h, d)
  layer["wq"] = w_qkv[:, :g].reshape(k * g, h, d)
  layer["wk"], layer["wv"] = w_qkv[:, g], w_qkv[:, g + 1]
  if "b_qkv" in layer:
    b_qkv = np.asarray(layer.pop("b_qkv")).reshape(k, g + 2, h)
    layer["bq"] = b_qkv[:, :g].reshape(k * g, h)
    layer["bk"], layer["bv"] = b_qkv[:, g], b_qkv[:, g + 1]
  gate_up = np.asarray(layer.pop("w_gate_up")).reshape(-1, 2, d)
  layer["w_gate"], layer["w_up"] = gate_up[:, 0], gate_up[:, 1]
  layer["wo"] = np.asarray(layer["wo"]).reshape(d, k * g, h)
  return layer


def linear(x_BxTxI: jax.Array, w_OxI, fusion: Optional[MatmulFusion] = None) -> jax.Array:
  """x @ w.T for an [out, in] weight (float or quantized): [B, T, I] -> [B, T, O], with the
  norm, SwiGLU and residual add of `fusion` around it (in the CPU kernel when it applies).

  An einsum contracting w's minor dim, not `x @ w.T`: XLA:CPU fuses a written-out transpose
  into a generated dot that runs about 1.3x slower at decode shapes (measured on SmolLM2).
  """
  fusion = fusion or MatmulFusion()
  if isinstance(w_OxI, quant_weights.QuantizedWeight):
    return quant_weights.linear(x_BxTxI, w_OxI, fusion)
  einsum = lambda x_BxTxI: jnp.einsum("BTI,OI->BTO", x_BxTxI, w_OxI)
  return cpu_kernels.float_matmul(x_BxTxI, w_OxI, fusion=fusion,
                                  fallback=lambda: fusion.apply(x_BxTxI, einsum))


def _residual_linear(x_BxTxI, w_OxI, residual_BxTxO, sharded: bool, fusion=MatmulFusion()):
  """residual + x @ w.T for a row-parallel weight: under tensor parallelism each shard holds
  some input columns, so the partial products are summed (all-reduced) before the residual
  joins; unsharded, the add is fused into the matmul."""
  if sharded:
    return residual_BxTxO + sharding.all_reduce(linear(x_BxTxI, w_OxI, fusion), sharded)
  return linear(x_BxTxI, w_OxI, dataclasses.replace(fusion, residual=residual_BxTxO))


def _attention_block(config, layer, x_BxTxD, positions_BxT, cache, layer_index, rope: Rope,
                     sharded: bool):
  """x + attention(rms_norm(x)) for one layer, and the cache with this step's keys/values."""
  b, t, _ = x_BxTxD.shape
  qkv_BxTxKG2H = linear(x_BxTxD, layer["w_qkv"],  # q, k and v in one matmul
                         MatmulFusion(norm_weight=layer["attn_norm"], norm_eps=config.norm_eps))
  if config.qkv_bias:
    qkv_BxTxKG2H = qkv_BxTxKG2H + layer["b_qkv"]
  qkv_BxTxKxG2xH = qkv_BxTxKG2H.reshape(b, t, config.n_kv_heads, -1, config.head_dim)
  if cache is None:
    q, k, v = rope.split_qkv(qkv_BxTxKxG2xH)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, K, H] -> [B, K, T, H]
    out_BxTxNxH = attention(q, heads_first(k), heads_first(v), positions_BxT, positions_BxT)
  else:
    # The cache applies RoPE, stores k/v and picks the attention implementation (XLA math, a
    # fused CPU decode kernel, or a paged-attention kernel).
    out_BxTxNxH, cache = cache.write_and_attend(layer_index, qkv_BxTxKxG2xH, rope, positions_BxT)
  # Row-parallel under tensor parallelism: each shard holds some heads' output columns.
  return _residual_linear(out_BxTxNxH.reshape(b, t, -1), layer["wo"], x_BxTxD, sharded), cache


def _mlp_block(config, layer, x_BxTxD, sharded: bool):
  """x + mlp(rms_norm(x)): SwiGLU of the gate/up projection, then the down projection."""
  gate_up_BxTxF2 = linear(x_BxTxD, layer["w_gate_up"],
                           MatmulFusion(norm_weight=layer["mlp_norm"], norm_eps=config.norm_eps))
  return _residual_linear(gate_up_BxTxF2, layer["w_down"], x_BxTxD, sharded,
                          MatmulFusion(swiglu=True))


def _embed(params: Params, tokens_BxT: jax.Array, sharded: bool) -> jax.Array:
  """Embedding rows; sharded over the vocabulary, each shard looks up the ids in its range and
  the all-reduce adds the one shard's row to the others' zeros."""
  table, dtype = params["embed"], params["final_norm"].dtype
  if not sharded:
    return quant_weights.embed(table, tokens_BxT, dtype)
  rows = (table.codes if isinstance(table, quant_weights.QuantizedWeight) else table).shape[0]
  local_BxT = tokens_BxT - sharding.shard_index() * rows
  mine_BxT = (local_BxT >= 0) & (local_BxT < rows)
  x_BxTxD = quant_weights.embed(table, jnp.where(mine_BxT, local_BxT, 0), dtype)
  return sharding.all_reduce(jnp.where(mine_BxT[..., None], x_BxTxD, 0), sharded)


def _local_hidden_states(params, tokens_BxT, positions_BxT, cache, *, config, sharded):
  rope = Rope.at(positions_BxT, rope_inverse_frequencies(config))
  x = _embed(params, tokens_BxT, sharded)
  for i, layer in enumerate(params["layers"]):
    x, cache = _attention_block(config, layer, x, positions_BxT, cache, i, rope, sharded)
    x = _mlp_block(config, layer, x, sharded)
  return rms_norm(x, params["final_norm"], config.norm_eps), cache


def hidden_states(params: Params, config: LlamaConfig, tokens_BxT: jax.Array,
                  positions_BxT: jax.Array, cache: Optional[Cache] = None):
  """Runs the decoder stack; returns the final-normed hidden states [B, T, D] and the cache.

  Traced under a mesh (`jinfer.sharding.use`), it runs per shard: heads, MLP units and
  vocabulary over `model`, rows over `data` (`jinfer.sharding.model_call`).
  """
  mesh = sharding.context_mesh()
  if mesh is None:
    return _local_hidden_states(params, tokens_BxT, positions_BxT, cache, config=config,
                                sharded=False)
  local = functools.partial(_local_hidden_states, config=sharding.local_config(config, mesh),
                            sharded=sharding.model_size(mesh) > 1)
  rows, caches = sharding.spec("batch"), sharding.cache_specs(cache)
  return sharding.model_call(local, mesh, (params, tokens_BxT, positions_BxT, cache),
                             (sharding.param_specs(params), rows, rows, caches), (rows, caches))


def _local_logits(head_VxD, h_BxTxD: jax.Array) -> jax.Array:
  if isinstance(head_VxD, quant_weights.QuantizedWeight):
    return quant_weights.linear(h_BxTxD.astype(jnp.float32), head_VxD)
  return cpu_kernels.float_matmul(
      h_BxTxD, head_VxD, out_dtype=jnp.float32,
      fallback=lambda: jnp.einsum("BTD,VD->BTV", h_BxTxD, head_VxD,
                                  preferred_element_type=jnp.float32))


def logits_from_hidden(params: Params, config: LlamaConfig, h_BxTxD: jax.Array) -> jax.Array:
  """Projects hidden states to float32 vocabulary logits [B, T, V] (sharded over the vocabulary
  under a mesh)."""
  name = "embed" if config.tie_embeddings else "lm_head"
  mesh = sharding.context_mesh()
  if mesh is None:
    return _local_logits(params[name], h_BxTxD)
  logits_BxTxV = sharding.model_call(
      _local_logits, mesh, (params[name], h_BxTxD),
      (sharding.param_specs({name: params[name]})[name], sharding.spec("batch")),
      sharding.spec("batch", None, "vocab"))
  return logits_BxTxV[..., :config.vocab_size]  # the vocabulary may be padded


def forward(params: Params, config: LlamaConfig, tokens_BxT: jax.Array, positions_BxT: jax.Array,
            cache: Optional[Cache] = None) -> tuple[jax.Array, Optional[Cache]]:
  """Logits [B, T, V] (float32) for `tokens` at `positions`, and the cache with their K/V written.

  With `cache=None` the tokens attend only to each other (a full forward pass); with a cache they
  are written at their positions first and attend to everything cached at earlier positions.
  """
  h, cache = hidden_states(params, config, tokens_BxT, positions_BxT, cache)
  return logits_from_hidden(params, config, h), cache


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
  """Random parameters in jinfer's layout (used by tests and benchmarks of random configs)."""
  d, n, k, h, f, v = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                      config.d_ff, config.vocab_size)
  shapes = {"wq": (n, h, d), "wk": (k, h, d), "wv": (k, h, d), "wo": (d, n, h),
            "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f)}
  if config.qkv_bias:
    shapes.update(bq=(n, h), bk=(k, h), bv=(k, h))
  keys = iter(jax.random.split(key, config.n_layers * len(shapes) + 2))
  normal = lambda shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)
  layers = []
  for _ in range(config.n_layers):
    layer = {name: normal(shape) for name, shape in shapes.items()}
    layer["attn_norm"] = jnp.ones((d,), dtype)
    layer["mlp_norm"] = jnp.ones((d,), dtype)
    layers.append(jax.tree.map(lambda x: jnp.asarray(x, dtype), pack_layer(layer)))
  params = {"embed": normal((v, d)), "final_norm": jnp.ones((d,), dtype), "layers": layers}
  if not config.tie_embeddings:
    params["lm_head"] = normal((v, d))
  return params
