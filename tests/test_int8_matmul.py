"""Int8 matmuls: Pallas kernels (interpret mode) vs the pure-JAX references, and the checks.

Weights are random int8 in [-127, 127] with per-channel or per-group scales; shapes include
M = 1, M not a multiple of block_m (padded rows), leading batch dims on x, and several tilings.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.int8_matmul import (
    benchmark,
    int8_matmul,
    int8_matmul_gpu,
    int8_matmul_tpu,
    int8_matmul_w8a8,
    int8_matmul_w8a8_gpu,
    int8_matmul_w8a8_tpu,
    quantize_per_token,
    ref_int8_matmul,
    ref_int8_matmul_w8a8,
)

# Relative to max |reference|: float32 differs only in summation order; bfloat16 outputs are
# one rounding of the same float32 value (1 ulp = 2^-8 relative). W8A8 sums int8 x int8 exactly
# in int32 and rescales in the same order as the reference: float32 agrees to an ulp or so.
TOLERANCE = {(False, jnp.float32): 1e-5, (False, jnp.bfloat16): 1e-2,
             (True, jnp.float32): 1e-6, (True, jnp.bfloat16): 8e-3}


def make_inputs(x_shape, n, *, dtype, groups=None, seed=0):
  """(x [..., K] in dtype, w_q int8 [N, K], scales f32 [N] or [N, groups])."""
  rng = np.random.default_rng(seed)
  k = x_shape[-1]
  x = jnp.asarray(rng.normal(size=x_shape), dtype)
  w_q = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
  scale_shape = (n,) if groups is None else (n, groups)
  scales = jnp.asarray(rng.uniform(1e-3, 2e-2, scale_shape), jnp.float32)
  return x, w_q, scales


def assert_close(got, want, *, w8a8: bool):
  assert got.shape == want.shape and got.dtype == want.dtype
  got32, want32 = (np.asarray(a.astype(jnp.float32)) for a in (got, want))
  tol = TOLERANCE[w8a8, want.dtype.type]
  assert np.isfinite(got32).all()
  np.testing.assert_allclose(got32, want32, rtol=tol, atol=tol * np.abs(want32).max())


# (x shape, N, groups, dtype, TPU tuning, GPU tuning). M = 1, 5, 37 (not a multiple of the
# block), batch dims; per-channel and per-group scales (one and two groups per K block).
CASES = {
    "m1_f32_default_blocks": ((1, 256), 384, None, jnp.float32, {}, {}),
    "m1_bf16_k_steps": ((1, 512), 256, None, jnp.bfloat16,
                        {"block_n": 128, "block_k": 128}, {"block_n": 32, "block_k": 64}),
    "m37_f32_group128_2per_block": ((37, 512), 256, 4, jnp.float32,
                                    {"block_m": 16, "block_n": 128, "block_k": 256},
                                    {"block_m": 16, "block_n": 64, "block_k": 256}),
    "m5_bf16_group64_1per_block": ((5, 256), 128, 4, jnp.bfloat16, {"block_k": 64},
                                   {"block_n": 16, "block_k": 64}),
    "batch2x3_f32_blocks": ((2, 3, 256), 256, None, jnp.float32,
                            {"block_m": 8, "block_n": 128, "block_k": 128},
                            {"block_m": 16, "block_n": 128, "block_k": 128}),
    "m37_bf16_group64_2per_block": ((37, 256), 128, 4, jnp.bfloat16,
                                    {"block_m": 32, "block_k": 128},
                                    {"block_m": 32, "block_n": 32, "block_k": 128}),
}
KERNELS = {
    "tpu": (int8_matmul_tpu, False), "tpu_w8a8": (int8_matmul_w8a8_tpu, True),
    "gpu": (int8_matmul_gpu, False), "gpu_w8a8": (int8_matmul_w8a8_gpu, True),
}
# Each case runs on one TPU and one GPU variant (not the full cross product: interpret mode is
# slow), alternating so every variant meets both dtypes and both kinds of scales. The fast tier
# runs every case once, on the TPU variant for cases 0-1, 4-5 and the GPU one for 2-3 (so all
# four variants run); the slow tier adds the other.
PAIRS = [pytest.param(c, kern, id=f"{c}-{kern}",
                      marks=() if j == (i // 2) % 2 else pytest.mark.slow)
         for i, c in enumerate(CASES)
         for j, kern in enumerate(("tpu_w8a8", "gpu") if i % 2 else ("tpu", "gpu_w8a8"))]


@pytest.mark.parametrize("case,kernel", PAIRS)
def test_kernel_matches_reference(case, kernel, interpret_for):
  x_shape, n, groups, dtype, tpu_tuning, gpu_tuning = CASES[case]
  x, w_q, scales = make_inputs(x_shape, n, dtype=dtype, groups=groups)
  fn, w8a8 = KERNELS[kernel]
  tuning = tpu_tuning if kernel.startswith("tpu") else gpu_tuning
  got = fn(x, w_q, scales, interpret=interpret_for(kernel), **tuning)
  want = (ref_int8_matmul_w8a8 if w8a8 else ref_int8_matmul)(x, w_q, scales)
  assert got.shape == (*x_shape[:-1], n)
  assert_close(got, want, w8a8=w8a8)


def test_tpu_kernel_in_tpu_simulating_interpreter():
  """The TPU kernels under InterpretParams (VMEM spaces and DMAs simulated), 2 K steps."""
  x, w_q, scales = make_inputs((3, 256), 128, dtype=jnp.float32, groups=2)
  params = pltpu.InterpretParams()
  got = int8_matmul_tpu(x, w_q, scales, block_k=128, interpret=params)
  assert_close(got, ref_int8_matmul(x, w_q, scales), w8a8=False)
  x, w_q, scales = make_inputs((3, 256), 128, dtype=jnp.bfloat16)
  got = int8_matmul_w8a8_tpu(x, w_q, scales, block_k=128, interpret=params)
  assert_close(got, ref_int8_matmul_w8a8(x, w_q, scales), w8a8=True)


def test_references_match_numpy_dequantized_matmul():
  x, w_q, scales = make_inputs((4, 256), 64, dtype=jnp.float32, groups=4, seed=1)
  x64, w64, s64 = (np.asarray(a, np.float64) for a in (x, w_q, scales))
  grouped = np.repeat(s64, 64, axis=1)  # [N, K]: every input column's group scale
  np.testing.assert_allclose(ref_int8_matmul(x, w_q, scales), x64 @ (w64 * grouped).T,
                             rtol=1e-5, atol=1e-5)
  per_channel = scales[:, 0]
  np.testing.assert_allclose(ref_int8_matmul(x, w_q, per_channel),
                             x64 @ (w64 * s64[:, :1]).T, rtol=1e-5, atol=1e-5)
  x_q, x_scale = quantize_per_token(x)
  want = (np.asarray(x_q, np.float64) @ w64.T) * np.asarray(x_scale)[:, None] * s64[:, 0]
  np.testing.assert_allclose(ref_int8_matmul_w8a8(x, w_q, per_channel), want, rtol=1e-6)


def test_quantize_per_token():
  x = jnp.asarray([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [3e-3, 1e-3, -3e-3]], jnp.float32)
  x_q, scale = quantize_per_token(x)
  assert x_q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (3,)
  np.testing.assert_allclose(scale, [2.0 / 127, 0.0, 3e-3 / 127], rtol=1e-6)
  np.testing.assert_array_equal(x_q[:, 1], [-127, 0, 42])  # absmax maps to -127; zero row -> 0
  assert np.all(np.abs(np.asarray(x_q)) <= 127)
  err = np.abs(np.asarray(x_q, np.float32) * np.asarray(scale)[:, None] - np.asarray(x))
  assert np.all(err <= np.asarray(scale)[:, None] / 2 + 1e-9)


def test_dispatch_backends_and_outer_jit():
  x, w_q, scales = make_inputs((2, 3, 256), 128, dtype=jnp.bfloat16)
  want, want_w8a8 = ref_int8_matmul(x, w_q, scales), ref_int8_matmul_w8a8(x, w_q, scales)
  # On CPU "auto" is the XLA reference and ignores kernel tuning.
  assert_close(int8_matmul(x, w_q, scales, block_n=128), want, w8a8=False)
  assert_close(int8_matmul_w8a8(x, w_q, scales, backend="xla"), want_w8a8, w8a8=True)
  got = int8_matmul(x, w_q, scales, backend="gpu", interpret=True, block_n=64, num_warps=2)
  assert_close(got, want, w8a8=False)
  # Inside an outer jit the checks see only shapes and dtypes; the kernel still runs.
  jitted = jax.jit(functools.partial(int8_matmul_w8a8, backend="tpu", interpret=True))
  assert_close(jitted(x, w_q, scales), want_w8a8, w8a8=True)
  for fn in (int8_matmul_tpu, int8_matmul_w8a8_gpu):  # an empty batch
    assert fn(x[:0], w_q, scales, interpret=True).shape == (0, 3, 128)


def _bad(**changes):
  """Valid small inputs (f32 x [4, 256], w_q [128, 256], per-channel scales) with changes."""
  x, w_q, scales = make_inputs((4, 256), 128, dtype=jnp.float32)
  args = {"x": x, "w_q": w_q, "scales": scales}
  args.update(changes)
  return args


@pytest.mark.parametrize("changes,message", [
    ({"x": jnp.zeros((4, 256), jnp.float16)}, "x must be float32 or bfloat16; got float16"),
    ({"x": jnp.zeros((), jnp.float32)}, "x must be [..., K]"),
    ({"w_q": jnp.zeros((128, 256), jnp.float32)}, "w_q must be a 2-D int8 [N, K]"),
    ({"w_q": jnp.zeros((2, 128, 256), jnp.int8)}, "w_q must be a 2-D int8 [N, K]"),
    ({"w_q": jnp.zeros((128, 200), jnp.int8)}, "K mismatch: x has K=256 input features"),
    ({"w_q": jnp.zeros((256, 128), jnp.int8)}, "w_q looks transposed"),
    ({"scales": jnp.ones((128,), jnp.bfloat16)}, "scales must be float32; got bfloat16"),
    ({"scales": jnp.ones((64,), jnp.float32)}, "scales must be [N=128] (per output channel)"),
    ({"scales": jnp.ones((128, 3), jnp.float32)}, "G dividing K=256 (group_size = K // G)"),
])
def test_validation_inputs(changes, message):
  for backend in ("xla", "tpu", "gpu"):
    for fn in (int8_matmul, int8_matmul_w8a8):
      with pytest.raises(ValueError, match=re.escape(message)):
        fn(**_bad(**changes), backend=backend, interpret=True)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_validation_blocks(backend):
  args = _bad(w_q=jnp.zeros((96, 256), jnp.int8), scales=jnp.ones((96, 2), jnp.float32))
  with pytest.raises(ValueError, match=r"block_n=64 must divide N=96 \(weights are not padded\)"):
    int8_matmul(**args, backend=backend, interpret=True, block_n=64)
  with pytest.raises(ValueError, match=r"block_k=64 must divide K=256 and be a multiple of "
                                       r"group_size=128 .* use one of: 128, 256"):
    int8_matmul(**args, backend=backend, interpret=True, block_k=64)
  with pytest.raises(ValueError, match="block_m must be at least 1; got 0"):
    int8_matmul(**args, backend=backend, interpret=True, block_m=0)


def test_validation_dispatch():
  args = _bad()
  with pytest.raises(ValueError, match="backend must be one of"):
    int8_matmul(**args, backend="cuda")
  with pytest.raises(ValueError, match="pass interpret=True"):
    int8_matmul_w8a8(**args, backend="tpu")
  with pytest.raises(ValueError, match="takes no tuning arguments"):
    int8_matmul(**args, backend="xla", block_n=128)


def test_validation_hardware_tiling():
  """Compiled-kernel tiling rules are checked (before lowering) when interpret=False."""
  args = tuple(_bad().values())  # f32 x [4, 256], w_q [128, 256]
  with pytest.raises(ValueError, match=r"TPU: block_n=64 must be a multiple of 128 or the "
                                       r"full dimension 128"):
    int8_matmul_tpu(*args, block_n=64)
  x16 = jnp.zeros((40, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"TPU: block_m=8 must be a multiple of 16 for bfloat16"):
    int8_matmul_tpu(x16, *args[1:], block_m=8)
  with pytest.raises(ValueError, match=r"TPU: block_m=16 must be a multiple of 32 for int8"):
    int8_matmul_w8a8_tpu(x16, *args[1:], block_m=16)
  grouped = (args[0], args[1], jnp.ones((128, 4), jnp.float32))  # group_size 64
  with pytest.raises(ValueError, match=r"TPU: group_size=64 .* pass block_k=64"):
    int8_matmul_tpu(*grouped, block_k=128)
  with pytest.raises(ValueError, match=r"GPU: block_n=96 must be a power of two >= 16"):
    int8_matmul_gpu(args[0], jnp.zeros((96, 256), jnp.int8), jnp.ones(96, jnp.float32),
                    block_n=96)
  with pytest.raises(ValueError, match=r"GPU: block_m=8 must be a power of two >= 16"):
    int8_matmul_w8a8_gpu(*args, block_m=8)
  with pytest.raises(ValueError, match=r"GPU: group_size=8 must be a power of two >= 16"):
    int8_matmul_gpu(args[0], args[1], jnp.ones((128, 32), jnp.float32), block_k=128)


def test_default_blocks_fit_the_hardware_rules():
  """Defaults for the real decode shapes are divisors that would compile (checks pass)."""
  from pallas_kernels.int8_matmul import gpu, tpu, validation
  for n, k in benchmark.SHAPE_SETS["smollm2"] + benchmark.SHAPE_SETS["llama8b"]:
    for m in (1, 64):
      dims = validation.Dims(m=m, n=n, k=k, groups=None)
      for act in (jnp.bfloat16, jnp.int8):
        bm, bn, bk = tpu.resolve_blocks(dims, act, None, None, None)
        validation.check_blocks(dims, bm, bn, bk)
        validation.check_tpu_tiling(dims, bm, bn, bk, act)
      bm, bn, bk = gpu.resolve_blocks(dims, None, None, None)
      validation.check_blocks(dims, bm, bn, bk)
      validation.check_gpu_tiling(dims, bm, bn, bk)
  dims = validation.Dims(m=1, n=4096, k=4096, groups=32)  # group_size 128
  assert tpu.resolve_blocks(dims, jnp.bfloat16, None, None, None) == (16, 512, 1024)
  assert gpu.resolve_blocks(dims, None, None, None) == (16, 32, 256)


@pytest.mark.slow
def test_benchmark_quick_mode_prints_figures():
  lines = []
  rows = benchmark.run(quick=True, log=lines.append)
  assert [(r.m, r.n, r.k) for r in rows] == [
      (m, n, k) for n, k in benchmark.SHAPE_SETS["smollm2"] for m in (1, 8)]
  for r in rows:
    assert set(r.us) == set(r.gbps) == {"int8", "w8a8", "bf16"}
    assert all(v > 0 and np.isfinite(v) for v in (*r.us.values(), *r.gbps.values()))
  text = "\n".join(lines)
  assert "int8/bf16 time" in text and "| 1 | 960 | 576 |" in text
  if jax.default_backend() == "cpu":
    assert "kernels need a TPU or GPU" in text
  assert benchmark.parse_shapes(["smollm2", "64x128"])[-1] == (64, 128)
  with pytest.raises(ValueError, match="NxK like 4096x4096"):
    benchmark.parse_shapes(["big"])
