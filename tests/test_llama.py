"""The functional model's own pieces: the packed layout and cache/no-cache agreement."""

import dataclasses

import jax
import numpy as np

from jinfer.cache import KVCache
from jinfer.models import config as config_lib
from jinfer.models import llama


def test_pack_then_unpack_returns_every_projection():
  cfg = dataclasses.replace(config_lib.TINY_GQA, qkv_bias=True)
  rng = np.random.default_rng(0)
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  shapes = {"wq": (n, h, d), "wk": (k, h, d), "wv": (k, h, d), "wo": (d, n, h),
            "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f), "bq": (n, h), "bk": (k, h),
            "bv": (k, h), "attn_norm": (d,), "mlp_norm": (d,)}
  layer = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
  packed = llama.pack_layer(layer)
  assert packed["w_qkv"].shape == (k * (n // k + 2) * h, d)
  assert packed["w_gate_up"].shape == (2 * f, d) and packed["wo"].shape == (d, n * h)
  # Query head j belongs to KV head j // G: its rows come first in that KV head's group.
  g = n // k
  np.testing.assert_array_equal(packed["w_qkv"][(g + 2) * h:(g + 3) * h], layer["wq"][g])
  unpacked = llama.unpack_layer(packed, cfg)
  assert unpacked.keys() == layer.keys()
  for name in layer:
    np.testing.assert_array_equal(unpacked[name], layer[name], err_msg=name)


def test_prefill_in_chunks_through_the_cache_equals_one_full_pass():
  cfg = config_lib.TINY_GQA
  params = llama.init_params(cfg, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
  positions = np.broadcast_to(np.arange(9), (2, 9))
  full, _ = llama.forward(params, cfg, tokens, positions)
  cache = KVCache.init(cfg, batch=2, max_len=16)
  first, cache = llama.forward(params, cfg, tokens[:, :4], positions[:, :4], cache)
  rest, cache = llama.forward(params, cfg, tokens[:, 4:], positions[:, 4:], cache)
  np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-5)
