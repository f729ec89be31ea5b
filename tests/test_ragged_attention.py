"""Ragged paged attention (packed prefill chunks and decode tokens of many sequences in one call):
the Pallas kernels in interpret mode against the XLA reference, the reference against a plain
per-query NumPy loop, and the input checks.

As in the decode kernel's tests, every page slot the kernels may not read (unused pages, page
tails past a sequence's cached tokens, tokens before every window) is NaN in the pool the kernels
read (random codes with NaN scales for int8): an output that is finite and equal to the
reference shows that nothing stray leaked in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.quant.kv import dequantize_kv, quantize_kv
from pallas_kernels.ragged_attention import (ragged_paged_attention, ragged_paged_attention_gpu,
                                             ragged_paged_attention_tpu,
                                             ref_ragged_paged_attention)
from pallas_kernels.ragged_attention import schedule

TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_inputs(seqs, *, n, k, h, s, dtype=jnp.float32, m=6, padding=3, sliding_window=None,
                seed=0):
  """Packed queries of `seqs` = [(kv_len, q_len), ...] plus `padding` rows of no sequence.

  Returns (q, k_nan, v_nan, k_clean, v_clean, page_tables, kv_lens, cu_q_lens) over a pool with
  shuffled page ids and some pages no sequence holds.
  """
  rng = np.random.default_rng(seed)
  num_pages = len(seqs) * m + 3
  perm = rng.permutation(num_pages)
  tables = np.full((len(seqs), m), -1, np.int32)
  visible = np.zeros((num_pages, s), bool)
  used = 0
  for row, (kv_len, q_len) in enumerate(seqs):
    need = -(-kv_len // s)
    tables[row, :need] = perm[used:used + need]
    used += need
    first_query = kv_len - q_len
    lo = 0 if sliding_window is None else max(first_query - sliding_window + 1, 0)
    for pos in range(lo, kv_len):
      visible[tables[row, pos // s], pos % s] = True
  k_clean, v_clean = (rng.normal(size=(k, num_pages, s, h)).astype(np.float32) for _ in "kv")
  nan = lambda x: np.where(visible[None, :, :, None], x, np.nan)
  q_lens = [q_len for _, q_len in seqs]
  q = rng.normal(size=(sum(q_lens) + padding, n, h)).astype(np.float32)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(nan(k_clean)), cast(nan(v_clean)), cast(k_clean), cast(v_clean),
          jnp.asarray(tables), jnp.asarray([kv for kv, _ in seqs], jnp.int32),
          jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32))


def numpy_attention(q, k_pages, v_pages, tables, kv_lens, cu_q_lens, *, scale=None,
                    soft_cap=None, sliding_window=None):
  """One query at a time: gather its sequence's keys up to its position, softmax, average."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  t, n, h = q.shape
  kv_heads, _, s, _ = k_pages.shape
  scale = h ** -0.5 if scale is None else scale
  out = np.zeros_like(q)
  for seq, kv_len in enumerate(np.asarray(kv_lens)):
    start, stop = int(cu_q_lens[seq]), int(cu_q_lens[seq + 1])
    positions = np.arange(kv_len)
    pages, slots = np.asarray(tables)[seq, positions // s], positions % s
    keys, values = k_pages[:, pages, slots], v_pages[:, pages, slots]  # [K, kv_len, H]
    for row in range(start, stop):
      pos = kv_len - (stop - start) + (row - start)
      lo = 0 if sliding_window is None else max(pos - sliding_window + 1, 0)
      for head in range(n):
        kh = head // (n // kv_heads)
        scores = keys[kh, lo:pos + 1] @ q[row, head] * scale
        if soft_cap is not None:
          scores = soft_cap * np.tanh(scores / soft_cap)
        p = np.exp(scores - scores.max())
        out[row, head] = p @ values[kh, lo:pos + 1] / p.sum()
  return out


# (n, k, h, s, dtype, seqs [(kv_len, q_len)], options): decode tokens (q_len 1) beside prefill
# chunks with and without history, chunks starting and ending inside pages, a whole table, an
# empty sequence, GQA ratios 1/3/4, page sizes 4/8/16.
CASES = {
    "mixed_g3_s8_f32": (6, 2, 64, 8, jnp.float32, [(20, 1), (13, 13), (30, 9), (1, 1)], {}),
    "prefill_g1_s4_f32": (2, 2, 32, 4, jnp.float32, [(24, 24), (0, 0), (7, 3)], {}),
    "window_cap_g4_s8_f32": (8, 2, 64, 8, jnp.float32, [(40, 17), (9, 1), (26, 26)],
                             {"sliding_window": 11, "soft_cap": 2.0}),
    "mixed_g3_s16_bf16": (3, 1, 64, 16, jnp.bfloat16, [(50, 21), (16, 1), (33, 33)], {}),
    "scale_g2_s8_f32": (4, 2, 64, 8, jnp.float32, [(48, 40), (3, 2)], {"scale": 0.3}),
}
KERNELS = {
    "tpu_bq8": functools.partial(ragged_paged_attention_tpu, queries_per_block=8),
    "tpu_bq16_ppb2": functools.partial(ragged_paged_attention_tpu, queries_per_block=16,
                                       pages_per_block=2),
    "gpu_bq8": functools.partial(ragged_paged_attention_gpu, queries_per_block=8),
    "gpu_bq4_ppb1": functools.partial(ragged_paged_attention_gpu, queries_per_block=4,
                                      pages_per_block=1),
}
# Each case meets one kernel variant in the fast tier (every variant runs) and the rest in slow.
PAIRS = [pytest.param(c, kern, id=f"{c}-{kern}",
                      marks=() if j == i % len(KERNELS) else pytest.mark.slow)
         for i, c in enumerate(CASES) for j, kern in enumerate(KERNELS)]


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_a_per_query_loop(case):
  n, k, h, s, dtype, seqs, options = CASES[case]
  q, _, _, k_clean, v_clean, tables, kv_lens, cu = make_inputs(
      seqs, n=n, k=k, h=h, s=s, sliding_window=options.get("sliding_window"))
  got = ref_ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu, **options)
  want = numpy_attention(q, k_clean, v_clean, tables, kv_lens, cu, **options)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
  assert not np.asarray(got)[int(cu[-1]):].any()  # padding rows: zeros


@pytest.mark.parametrize("case,kernel", PAIRS)
def test_kernel_matches_reference(case, kernel, interpret_for):
  n, k, h, s, dtype, seqs, options = CASES[case]
  q, k_nan, v_nan, k_clean, v_clean, tables, kv_lens, cu = make_inputs(
      seqs, n=n, k=k, h=h, s=s, dtype=dtype, sliding_window=options.get("sliding_window"))
  want = ref_ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu, **options)
  got = KERNELS[kernel](q, k_nan, v_nan, tables, kv_lens, cu, interpret=interpret_for(kernel),
                        **options)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert np.isfinite(np.asarray(got, np.float32)).all()
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **TOLERANCE[dtype])


@pytest.mark.parametrize("kernel", ["tpu_bq8", "gpu_bq8"])
def test_int8_pages_match_the_dequantized_reference(kernel, interpret_for):
  seqs = [(30, 12), (17, 1), (9, 9)]
  q, _, _, k_clean, v_clean, tables, kv_lens, cu = make_inputs(seqs, n=6, k=2, h=32, s=8)
  # [K, P, S, H] -> int8 codes with one scale per (head, page, slot), then NaN scales wherever
  # no query may look (codes there stay finite random values).
  k_q, k_scale = quantize_kv(k_clean)
  v_q, v_scale = quantize_kv(v_clean)
  _, k_nan, _, _, _, _, _, _ = make_inputs(seqs, n=6, k=2, h=32, s=8)
  hidden = np.isnan(np.asarray(k_nan)[..., 0])
  k_scale_nan = jnp.where(hidden, jnp.nan, k_scale)
  v_scale_nan = jnp.where(hidden, jnp.nan, v_scale)
  want = ref_ragged_paged_attention(q, dequantize_kv(k_q, k_scale), dequantize_kv(v_q, v_scale),
                                    tables, kv_lens, cu)
  got = KERNELS[kernel](q, k_q, v_q, tables, kv_lens, cu, k_scales=k_scale_nan,
                        v_scales=v_scale_nan, interpret=interpret_for(kernel))
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_each_page_is_read_once_per_block_of_queries():
  """The work items: a 40-query chunk in blocks of 16 is 3 items (16, 16, 8 queries), a decode
  token 1, the rest idle; each item's key span ends at its last query and starts at the window."""
  cu = jnp.asarray([0, 40, 41, 41], jnp.int32)
  kv_lens = jnp.asarray([100, 7, 0], jnp.int32)
  items = schedule.work_items(cu, kv_lens, 48, 16, sliding_window=30)
  rows = np.asarray(items.rows_W)
  assert len(rows) == schedule.num_work_items(48, 3, 16) == 6
  assert rows.tolist() == [16, 16, 8, 1, 0, 0]
  assert np.asarray(items.seq_W)[:4].tolist() == [0, 0, 0, 1]
  assert np.asarray(items.q_start_W)[:4].tolist() == [0, 16, 32, 40]
  assert np.asarray(items.first_position_W)[:4].tolist() == [60, 76, 92, 6]
  assert np.asarray(items.hi_W)[:4].tolist() == [76, 92, 100, 7]
  assert np.asarray(items.lo_W)[:4].tolist() == [31, 47, 63, 0]


def test_dispatch_runs_the_reference_on_cpu_and_checks_backends():
  seqs = [(12, 5), (4, 1)]
  q, _, _, k_clean, v_clean, tables, kv_lens, cu = make_inputs(seqs, n=2, k=1, h=16, s=4)
  want = ref_ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu)
  if jax.default_backend() == "cpu":
    got = ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu, queries_per_block=8)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="interpret=True"):
      ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu, backend="tpu")
  with pytest.raises(ValueError, match="backend must be one of"):
    ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu, backend="cuda")
  with pytest.raises(ValueError, match="takes no tuning"):
    ragged_paged_attention(q, k_clean, v_clean, tables, kv_lens, cu, backend="xla",
                           queries_per_block=8)


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "cu_q_lens": jnp.asarray([0, 5, 4], jnp.int32)}, "non-decreasing"),
    (lambda a: {**a, "cu_q_lens": jnp.asarray([0, 5, 99], jnp.int32)}, "non-decreasing"),
    (lambda a: {**a, "cu_q_lens": jnp.asarray([0, 5], jnp.int32)}, r"S \+ 1"),
    (lambda a: {**a, "kv_lens": jnp.asarray([3, 4], jnp.int32)}, "write their K/V first"),
    (lambda a: {**a, "kv_lens": jnp.asarray([12, 999], jnp.int32)}, "Grow page_tables"),
    (lambda a: {**a, "kv_lens": jnp.asarray([12.0, 4.0])}, "integer array"),
    (lambda a: {**a, "page_tables": a["page_tables"].astype(jnp.float32)}, "int32"),
    (lambda a: {**a, "q": a["q"][0]}, r"\[T, N, H\]"),
    (lambda a: {**a, "q": a["q"].astype(jnp.bfloat16)}, "one floating dtype"),
    (lambda a: {**a, "soft_cap": 0.0}, "soft_cap"),
    (lambda a: {**a, "sliding_window": 0}, "sliding_window"),
    (lambda a: {**a, "queries_per_block": 12}, "power of two"),
])
def test_bad_inputs_are_refused_with_the_fix(change, match):
  seqs = [(12, 5), (4, 1)]
  q, k_nan, v_nan, _, _, tables, kv_lens, cu = make_inputs(seqs, n=2, k=1, h=16, s=4)
  args = {"q": q, "k_pages": k_nan, "v_pages": v_nan, "page_tables": tables,
          "kv_lens": kv_lens, "cu_q_lens": cu}
  args = change(args)
  with pytest.raises(ValueError, match=match):
    ragged_paged_attention_tpu(args.pop("q"), args.pop("k_pages"), args.pop("v_pages"),
                               args.pop("page_tables"), args.pop("kv_lens"),
                               args.pop("cu_q_lens"), interpret=True, **args)
