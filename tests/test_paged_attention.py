"""Decode paged attention: Pallas kernels (interpret mode) vs the pure-JAX reference.

Every page slot not holding a visible token (unused pages, page tails past the length, tokens
before a sliding window) is NaN in the pool the kernels read, and random in the clean pool the
reference reads: an output that is finite and equal to the reference shows no stray read leaked.
int8 pools cannot hold NaN: there the unused slots get random codes and NaN scales.
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from jinfer.models import llama
from jinfer.quant.kv import dequantize_kv, quantize_kv
from pallas_kernels.paged_attention import (paged_attention, paged_attention_gpu,
                                            paged_attention_tpu, ref_paged_attention)
from pallas_kernels.paged_attention import tpu as tpu_lib

PAGES_PER_ROW = 4  # M: page-table entries per row
TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_inputs(lengths, *, n, k, h, s, dtype, sliding_window=None, seed=0, m=PAGES_PER_ROW):
  """(q, k_nan, v_nan, k_clean, v_clean, page_tables, lengths) with shuffled page tables."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  num_pages = b * m + 3  # some pages stay unused
  perm = rng.permutation(num_pages)
  tables = np.full((b, m), -1, np.int32)
  visible = np.zeros((num_pages, s), bool)
  used = 0
  for row, length in enumerate(lengths):
    need = -(-length // s)
    tables[row, :need] = perm[used:used + need]
    used += need
    lo = 0 if sliding_window is None else max(length - sliding_window, 0)
    for pos in range(lo, length):
      visible[tables[row, pos // s], pos % s] = True
  cast = lambda x: jnp.asarray(x, dtype)
  k_clean, v_clean = (rng.normal(size=(k, num_pages, s, h)).astype(np.float32) for _ in "kv")
  nan = lambda x: np.where(visible[None, :, :, None], x, np.nan)
  q = rng.normal(size=(b, n, h)).astype(np.float32)
  return (cast(q), cast(nan(k_clean)), cast(nan(v_clean)), cast(k_clean), cast(v_clean),
          jnp.asarray(tables), jnp.asarray(lengths, jnp.int32))


# (n, k, h, s, dtype, lengths, options): GQA ratios 1/3/8/4, page sizes 8/16, head dims 64/128,
# lengths 0, 1, exact page multiples (incl. a full table) and ragged.
CASES = {
    "g1_s8_h64_f32": (8, 8, 64, 8, jnp.float32, (0, 1, 32), {}),
    "g3_s16_h128_bf16": (6, 2, 128, 16, jnp.bfloat16, (16, 0, 37), {}),
    "g8_s16_h128_f32": (8, 1, 128, 16, jnp.float32, (1, 64, 33), {}),
    "g3_s8_h64_f32_softcap": (3, 1, 64, 8, jnp.float32, (24, 5, 0), {"soft_cap": 2.0}),
    "g8_s8_h64_bf16_window": (8, 1, 64, 8, jnp.bfloat16, (32, 9, 3), {"sliding_window": 11}),
    "g4_s16_h64_f32_cap_window": (8, 2, 64, 16, jnp.float32, (64, 17, 40),
                                  {"soft_cap": 3.0, "sliding_window": 20}),
    "g1_s16_h128_bf16_scale": (2, 2, 128, 16, jnp.bfloat16, (50, 7), {"scale": 0.2}),
}
KERNELS = {
    "tpu_ppb1": functools.partial(paged_attention_tpu, pages_per_block=1),
    "tpu_ppb2": functools.partial(paged_attention_tpu, pages_per_block=2),
    "gpu_split2": functools.partial(paged_attention_gpu, num_splits=2),
    "gpu_split4_ppb1": functools.partial(paged_attention_gpu, num_splits=4, pages_per_block=1),
}
# Each case runs on one TPU and one GPU variant (not the full cross product: interpret mode is
# slow), alternating so every variant meets several cases. The fast tier runs every case once,
# on the TPU variant for cases 0-1, 4-5 and the GPU one for 2-3, 6 (so all four variants run);
# the slow tier adds the other.
PAIRS = [pytest.param(c, kern, id=f"{c}-{kern}",
                      marks=() if j == (i // 2) % 2 else pytest.mark.slow)
         for i, c in enumerate(CASES)
         for j, kern in enumerate(("tpu_ppb1", "gpu_split2") if i % 2
                                  else ("tpu_ppb2", "gpu_split4_ppb1"))]


@pytest.mark.parametrize("case,kernel", PAIRS)
def test_kernel_matches_reference(case, kernel, interpret_for):
  n, k, h, s, dtype, lengths, options = CASES[case]
  q, k_nan, v_nan, k_clean, v_clean, tables, lengths = make_inputs(
      lengths, n=n, k=k, h=h, s=s, dtype=dtype, sliding_window=options.get("sliding_window"))
  out = KERNELS[kernel](q, k_nan, v_nan, tables, lengths, interpret=interpret_for(kernel),
                        **options)
  want = ref_paged_attention(q, k_clean, v_clean, tables, lengths, **options)
  chex.assert_equal_shape([out, q])
  chex.assert_type(out, q.dtype)
  out32 = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out32).all()
  np.testing.assert_allclose(out32, np.asarray(want.astype(jnp.float32)), **TOLERANCE[dtype])
  np.testing.assert_array_equal(out32[np.asarray(lengths) == 0], 0.0)


def make_int8_inputs(lengths, *, n, k, h, s, q_dtype, sliding_window=None, seed=0):
  """(q, k_q, v_q, k_scales, v_scales, k_deq, v_deq, page_tables, lengths) for int8 pages.

  k_q/v_q hold random codes and k/v_scales NaN in every slot not visible; k_deq/v_deq are the
  clean dequantized float32 pools the reference reads.
  """
  q, k_nan, _, k_clean, v_clean, tables, lengths = make_inputs(
      lengths, n=n, k=k, h=h, s=s, dtype=jnp.float32, sliding_window=sliding_window, seed=seed)
  visible_KxPxS = ~np.isnan(np.asarray(k_nan)[..., 0])
  rng = np.random.default_rng(seed + 1)
  pools = []
  for clean in (k_clean, v_clean):
    codes, scales = (np.asarray(x) for x in quantize_kv(clean))
    garbage = rng.integers(-127, 128, codes.shape).astype(np.int8)
    pools.append((jnp.asarray(np.where(visible_KxPxS[..., None], codes, garbage)),
                  jnp.asarray(np.where(visible_KxPxS, scales, np.nan)),
                  dequantize_kv(codes, scales)))
  (k_q, k_s, k_deq), (v_q, v_s, v_deq) = pools
  return q.astype(q_dtype), k_q, v_q, k_s, v_s, k_deq, v_deq, tables, lengths


# (n, k, h, s, q dtype, lengths, options, kernel): GQA 1/3/8/4, both query dtypes, lengths 0, 1,
# exact page multiples and ragged, each TPU and GPU variant at least once.
INT8_CASES = {
    "g1_s8_f32": (4, 4, 64, 8, jnp.float32, (0, 1, 32), {}, "tpu_ppb2"),
    "g3_s16_bf16": (6, 2, 64, 16, jnp.bfloat16, (16, 0, 37), {}, "gpu_split2"),
    "g8_s8_f32_window": (8, 1, 64, 8, jnp.float32, (32, 9, 1), {"sliding_window": 11},
                         "gpu_split4_ppb1"),
    "g4_s8_bf16_softcap": (8, 2, 128, 8, jnp.bfloat16, (24, 5, 0), {"soft_cap": 2.0},
                           "tpu_ppb1"),
    "g3_s8_f32_scale": (3, 1, 64, 8, jnp.float32, (8, 17), {"scale": 0.3}, "gpu_split2"),
}


INT8_FAST = ("g1_s8_f32", "g8_s8_f32_window")  # a TPU and a GPU variant; the rest are slow


@pytest.mark.parametrize("case", [c if c in INT8_FAST else pytest.param(c, marks=pytest.mark.slow)
                                  for c in INT8_CASES])
def test_int8_kernel_matches_reference_on_dequantized_pages(case, interpret_for):
  n, k, h, s, q_dtype, lengths, options, kernel = INT8_CASES[case]
  q, k_q, v_q, k_s, v_s, k_deq, v_deq, tables, lengths = make_int8_inputs(
      lengths, n=n, k=k, h=h, s=s, q_dtype=q_dtype, sliding_window=options.get("sliding_window"))
  out = KERNELS[kernel](q, k_q, v_q, tables, lengths, k_scales=k_s, v_scales=v_s,
                        interpret=interpret_for(kernel), **options)
  want = ref_paged_attention(q, k_deq, v_deq, tables, lengths, **options)
  chex.assert_equal_shape([out, q])
  chex.assert_type(out, q.dtype)
  out32 = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out32).all()
  np.testing.assert_allclose(out32, np.asarray(want.astype(jnp.float32)), **TOLERANCE[q_dtype])
  np.testing.assert_array_equal(out32[np.asarray(lengths) == 0], 0.0)


def test_int8_reference_and_dispatch_dequantize():
  """ref with scales == ref on dequantized pages; paged_attention routes the scales everywhere."""
  q, k_q, v_q, k_s, v_s, k_deq, v_deq, tables, lengths = make_int8_inputs(
      (3, 0, 20), n=4, k=2, h=64, s=8, q_dtype=jnp.float32)
  want = ref_paged_attention(q, k_deq, v_deq, tables, lengths)
  got = ref_paged_attention(q, k_q, v_q, tables, lengths, k_scales=k_s, v_scales=v_s)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  args, scales = (q, k_q, v_q, tables, lengths), dict(k_scales=k_s, v_scales=v_s)
  np.testing.assert_allclose(paged_attention(*args, **scales), want, atol=2e-5)
  jitted = jax.jit(lambda *a, **kw: paged_attention(*a, backend="gpu", interpret=True, **kw))
  np.testing.assert_allclose(jitted(*args, **scales), want, atol=2e-5)


def test_int8_tpu_kernel_in_tpu_simulating_interpreter():
  """The int8 TPU kernel under InterpretParams: the [K, P, 1, S_page] scale blocks DMA'd too."""
  q, k_q, v_q, k_s, v_s, k_deq, v_deq, tables, lengths = make_int8_inputs(
      (0, 1, 20), n=3, k=1, h=64, s=8, q_dtype=jnp.float32)
  out = paged_attention_tpu(q, k_q, v_q, tables, lengths, k_scales=k_s, v_scales=v_s,
                            pages_per_block=2, interpret=pltpu.InterpretParams())
  want = ref_paged_attention(q, k_deq, v_deq, tables, lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOLERANCE[jnp.float32])


UNEVEN_TABLE_KERNELS = {
    "tpu_ppb2": functools.partial(paged_attention_tpu, pages_per_block=2),
    "gpu_split4_ppb2": functools.partial(paged_attention_gpu, num_splits=4, pages_per_block=2),
}


@pytest.mark.parametrize("kernel", UNEVEN_TABLE_KERNELS)
def test_page_table_not_a_multiple_of_the_block(kernel, interpret_for):
  """M = 3 pages: the last TPU block and the GPU splits run past the table (padded/clamped)."""
  q, k_nan, v_nan, k_clean, v_clean, tables, lengths = make_inputs(
      (24, 17, 0), n=4, k=2, h=64, s=8, dtype=jnp.float32, m=3, seed=1)
  out = UNEVEN_TABLE_KERNELS[kernel](q, k_nan, v_nan, tables, lengths,
                                    interpret=interpret_for(kernel))
  want = ref_paged_attention(q, k_clean, v_clean, tables, lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOLERANCE[jnp.float32])


def test_tpu_kernel_in_tpu_simulating_interpreter():
  """The TPU kernel under InterpretParams (VMEM/SMEM spaces and DMAs simulated), windowed."""
  options = dict(sliding_window=11, soft_cap=2.0)
  q, k_nan, v_nan, k_clean, v_clean, tables, lengths = make_inputs(
      (0, 1, 20), n=3, k=1, h=64, s=8, dtype=jnp.float32, sliding_window=11)
  out = paged_attention_tpu(q, k_nan, v_nan, tables, lengths, pages_per_block=2,
                            interpret=pltpu.InterpretParams(), **options)
  want = ref_paged_attention(q, k_clean, v_clean, tables, lengths, **options)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOLERANCE[jnp.float32])


def test_reference_matches_dense_llama_attention():
  """The reference equals llama.attention on the gathered sequence (query at length - 1)."""
  n, k, h, s = 6, 2, 64, 8
  q, k_nan, v_nan, k_clean, v_clean, tables, lengths = make_inputs(
      (5, 32, 16), n=n, k=k, h=h, s=s, dtype=jnp.float32)
  got = ref_paged_attention(q, k_nan, v_nan, tables, lengths)
  assert np.isfinite(np.asarray(got)).all()
  dense = lambda pages: pages[:, jnp.maximum(tables, 0)].transpose(1, 0, 2, 3, 4).reshape(
      len(lengths), k, PAGES_PER_ROW * s, h)
  k_positions = jnp.broadcast_to(jnp.arange(PAGES_PER_ROW * s), (len(lengths), PAGES_PER_ROW * s))
  want = llama.attention(q[:, None], dense(k_clean), dense(v_clean), (lengths - 1)[:, None],
                         k_positions)[:, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_tpu_index_map_fetches_only_visible_pages():
  """Every page the TPU pipeline is asked to fetch is one of the row's visible pages."""
  s, window = 8, 11
  lengths, tables = np.array([0, 9, 32, 20]), np.array(
      [[-1, -1, -1, -1], [7, 2, -1, -1], [4, 0, 9, 5], [3, 8, 1, -1]], np.int32)
  for ppb in (1, 2, 3):
    for j in range(ppb):
      index_map = tpu_lib._kv_index_map(j, pages_per_block=ppb, page_size=s, max_pages=4,
                                        num_pages=10, sliding_window=window)
      for row, length in enumerate(lengths):
        allowed = {int(tables[row, pos // s]) for pos in range(max(length - window, 0), length)}
        for i in range(-(-4 // ppb)):
          head, page, *_ = index_map(row, 1, i, lengths, tables.reshape(-1))
          assert int(head) == 1
          assert int(page) in (allowed or set(range(10))), (ppb, j, row, i, int(page))


def test_dispatch_backends_and_outer_jit():
  q, k_nan, v_nan, k_clean, v_clean, tables, lengths = make_inputs(
      (3, 0, 20), n=4, k=2, h=64, s=8, dtype=jnp.float32)
  want = ref_paged_attention(q, k_clean, v_clean, tables, lengths)
  args = (q, k_nan, v_nan, tables, lengths)
  # On CPU "auto" is the XLA reference and ignores kernel tuning.
  np.testing.assert_allclose(paged_attention(*args, pages_per_block=2), want, atol=2e-5)
  np.testing.assert_allclose(paged_attention(*args, backend="xla"), want, atol=2e-5)
  np.testing.assert_allclose(paged_attention(*args, backend="gpu", interpret=True, num_splits=2),
                             want, atol=2e-5)
  # Inside an outer jit lengths are traced: the value check is skipped, the kernel still runs.
  jitted = jax.jit(lambda *a: paged_attention(*a, backend="tpu", interpret=True))
  np.testing.assert_allclose(jitted(*args), want, atol=2e-5)


def _bad(**changes):
  """Valid small inputs (f32, S_page 8, H 64, N 4, K 2) with some replaced."""
  q, k_nan, v_nan, _, _, tables, lengths = make_inputs((3, 9), n=4, k=2, h=64, s=8,
                                                       dtype=jnp.float32)
  args = dict(q=q, k_pages=k_nan, v_pages=v_nan, page_tables=tables, lengths=lengths)
  args.update(changes)
  return args


@pytest.mark.parametrize("changes,message", [
    (dict(q=jnp.zeros((2, 3, 64))), "multiple of KV heads K=2"),
    (dict(q=jnp.zeros((2, 4, 32))), "head dim H of q (32)"),
    (dict(q=jnp.zeros((2, 4, 64), jnp.bfloat16)), "share one floating dtype"),
    (dict(page_tables=np.zeros((2, 4), np.int64)), "page_tables must be int32"),
    (dict(page_tables=jnp.zeros((3, 4), jnp.int32)), "page_tables must be [B=2, M]"),
    (dict(lengths=jnp.array([3, 33], jnp.int32)), "lengths must lie in [0, M * S_page] = [0, 32]"),
    (dict(lengths=jnp.array([3], jnp.int32)), "lengths must be an integer array of shape [B=2]"),
])
def test_validation_shapes(changes, message):
  for backend in ("xla", "tpu", "gpu"):
    with pytest.raises(ValueError, match=re.escape(message)):
      paged_attention(**_bad(**changes), backend=backend, interpret=True)


def _bad_int8(**changes):
  """Valid small int8 inputs (f32 q, S_page 8, H 64, N 4, K 2) with some replaced."""
  q, k_q, v_q, k_s, v_s, _, _, tables, lengths = make_int8_inputs((3, 9), n=4, k=2, h=64, s=8,
                                                                  q_dtype=jnp.float32)
  args = dict(q=q, k_pages=k_q, v_pages=v_q, page_tables=tables, lengths=lengths, k_scales=k_s,
              v_scales=v_s)
  args.update(changes)
  return {name: value for name, value in args.items() if value is not None}


@pytest.mark.parametrize("changes,message", [
    (dict(k_scales=None, v_scales=None), "int8 k_pages/v_pages need k_scales and v_scales"),
    (dict(v_scales=None), "k_scales and v_scales must be given together"),
    (dict(k_pages=jnp.zeros((2, 11, 8, 64))), "k_pages and v_pages must be int8"),
    (dict(q=jnp.zeros((2, 4, 64), jnp.int8)), "q must be floating"),
    (dict(k_scales=jnp.ones((2, 11, 8), jnp.bfloat16)), "k_scales must be float32 [K, P, S_page]"),
    (dict(v_scales=jnp.ones((2, 11, 8, 1), jnp.float32)),
     "v_scales must be float32 [K, P, S_page] = (2, 11, 8)"),
])
def test_validation_int8_scales(changes, message):
  for backend in ("xla", "tpu", "gpu"):
    with pytest.raises(ValueError, match=re.escape(message)):
      paged_attention(**_bad_int8(**changes), backend=backend, interpret=True)


def test_validation_int8_tpu_tiling():
  """int8 tiles pack 32 rows per sublane tile: S_page must be a multiple of 32 on TPU."""
  q, k_q, v_q, k_s, v_s, _, _, tables, lengths = make_int8_inputs(
      (3, 9), n=4, k=2, h=128, s=16, q_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"TPU: page size S_page=16 must be a multiple of 32 for "
                                       r"int8"):
    paged_attention_tpu(q, k_q, v_q, tables, lengths, k_scales=k_s, v_scales=v_s)


def test_validation_options_and_dispatch():
  args = _bad()
  with pytest.raises(ValueError, match="soft_cap must be positive"):
    paged_attention(**args, backend="xla", soft_cap=0.0)
  with pytest.raises(ValueError, match="sliding_window must be at least 1"):
    paged_attention(**args, backend="tpu", interpret=True, sliding_window=0)
  with pytest.raises(ValueError, match="pages_per_block must be at least 1"):
    paged_attention(**args, backend="tpu", interpret=True, pages_per_block=0)
  with pytest.raises(ValueError, match="backend must be one of"):
    paged_attention(**args, backend="cuda")
  with pytest.raises(ValueError, match="pass interpret=True"):
    paged_attention(**args, backend="tpu")
  with pytest.raises(ValueError, match="takes no tuning arguments"):
    paged_attention(**args, backend="xla", num_splits=2)


def test_validation_hardware_tiling():
  """Compiled-kernel tiling rules are checked (before lowering) when interpret=False."""
  args = tuple(_bad().values())  # f32, S_page 8, H 64
  with pytest.raises(ValueError, match=r"TPU: head dim H=64 must be a multiple of 128"):
    paged_attention_tpu(*args)
  q, k, v, _, _, tables, lengths = make_inputs((3, 9), n=4, k=2, h=128, s=8,
                                               dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"TPU: page size S_page=8 must be a multiple of 16 for "
                                       r"bfloat16"):
    paged_attention_tpu(q, k, v, tables, lengths)
  with pytest.raises(ValueError, match=r"GPU: page size S_page=8 and pages_per_block=1 .* "
                                       r"Raise pages_per_block to 2"):
    paged_attention_gpu(*args, pages_per_block=1)
  with pytest.raises(ValueError, match=r"GPU: num_splits=3 must be a power of two"):
    paged_attention_gpu(*args, num_splits=3)
  q48, k48, v48 = (jnp.zeros(x.shape[:-1] + (48,), x.dtype) for x in args[:3])
  with pytest.raises(ValueError, match=r"GPU: head dim H=48 must be a power of two >= 16"):
    paged_attention_gpu(q48, k48, v48, *args[3:])
