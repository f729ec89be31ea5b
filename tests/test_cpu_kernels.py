"""Native CPU decode kernels (jinfer/cpu_kernels): each against the XLA computation it replaces,
when they apply (the lowered program calls them) and when they fall back, and the build's
failure paths (no compiler, a failing compile, disabled by the environment)."""

import dataclasses
import logging
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer import cpu_kernels
from jinfer.cache.kv_cache import KVCache
from jinfer.cpu_kernels import build
from jinfer.models.rope import Rope
from jinfer.quant import weights as qw

_SUPPORTED = (sys.platform == "linux" and os.uname().machine == "x86_64"
              and build._compiler() is not None and os.environ.get(build.DISABLE_ENV) != "0")


def test_kernels_build_where_supported():
  """On x86-64 Linux with a C++ compiler the kernels must build: a broken kernels.cc would
  otherwise skip every test below and leave decode on XLA's slower ops unnoticed."""
  if not _SUPPORTED:
    pytest.skip("no C++ compiler, not x86-64 Linux, or disabled by JINFER_CPU_KERNELS=0")
  build.compiled_library()  # raises with the compiler's error if kernels.cc does not build
  assert cpu_kernels.available()


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="jinfer CPU kernels unavailable on this machine")

RNG = np.random.default_rng(0)


def _normal(*shape):
  return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def _einsum(x, w):
  return jnp.einsum("BTI,OI->BTO", x.astype(jnp.float32), w.astype(jnp.float32))


def _wrong(like):
  """A fallback whose result a test would reject (platform_dependent traces both branches)."""
  return lambda: jnp.full_like(like, jnp.nan)


def _lowered_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 5, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float_matmul_matches_xla(rows, dtype):
  x, w = _normal(rows, 1, 96), _normal(40, 96).astype(dtype)  # N not a multiple of a chunk
  fn = lambda x, w: cpu_kernels.float_matmul(x, w, fallback=lambda: _einsum(x, w),
                                             out_dtype=jnp.float32)
  assert "jinfer_matmul_" in _lowered_text(fn, x, w)
  np.testing.assert_allclose(jax.jit(fn)(x, w), _einsum(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 7, 12])  # x rows in tiles of 4, and a remainder
@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int8", 32), ("int4", 32),
                                             ("int4", 64), ("w8a8", None), ("w8a8", 64)])
@needs_kernels
def test_quantized_linear_matches_dequantized_weights(rows, mode, group_size):
  w = qw.quantize(_normal(48, 128) + 0.25, mode, group_size)
  x = _normal(rows, 1, 128)
  fn = lambda x, w: qw.linear(x, w)
  assert "jinfer_matmul_int" in _lowered_text(fn, x, w)
  got = jax.jit(fn)(x, w)
  if mode == "w8a8":  # the reference quantizes the activations the same way
    from pallas_kernels.int8_matmul import ref_int8_matmul_w8a8
    want = ref_int8_matmul_w8a8(x, w.codes, w.scales)
  else:
    want = _einsum(x, w.dequantize())
  atol = 2e-4
  if mode == "int4":
    # With AVX-512 VNNI or AVX2 the kernel represents each block of 32 inputs as
    # d * (q1 + q2 / 256), d = max|x| / 127 (two int8 levels for integer dot products): each
    # input is off by at most d / 256, so an output by at most sum_k |w[n, k]| * d(k) / 256.
    d_MxK = np.repeat(np.abs(np.asarray(x)).reshape(rows, -1, 32).max(-1) / 127, 32, axis=-1)
    atol += float(((d_MxK / 256) @ np.abs(np.asarray(w.dequantize())).T).max())
    assert atol < 0.02  # the bound stays far below a wrong kernel's errors (order 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("k", [576, 608, 96])  # 4.5 and 4.75 quads of 128 inputs, and 0.75
def test_int4_kernel_over_partial_quads_and_many_groups(rows, k):
  w = qw.quantize(_normal(36, k) + 0.25, "int4", 32)  # 18-19 groups: past one 16-wide chunk
  x = _normal(rows, 1, k)
  got = jax.jit(qw.linear)(x, w)
  want = _einsum(x, w.dequantize())
  d_MxK = np.repeat(np.abs(np.asarray(x)).reshape(rows, -1, 32).max(-1) / 127, 32, axis=-1)
  bound = 2e-4 + float(((d_MxK / 256) @ np.abs(np.asarray(w.dequantize())).T).max())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=bound)


def _weight(mode, out_features, in_features):
  w = _normal(out_features, in_features) * 0.1 + 0.02
  return w if mode == "float32" else qw.quantize(w, mode)


def _matmul(x, w, fusion=None):
  """The model's matmul entry point for a float or quantized weight."""
  from jinfer.models import llama  # pylint: disable=g-import-not-at-top
  return llama.linear(x, w, fusion)


@needs_kernels
@pytest.mark.parametrize("mode", ["float32", "int8", "int4", "w8a8"])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("part", ["norm", "swiglu", "residual", "swiglu+residual"])
def test_fused_norm_swiglu_and_residual_equal_the_xla_ops(mode, rows, part):
  """A matmul call with its layer's RMSNorm (q/k/v, gate/up), SwiGLU (down projection) or
  residual add (output, down) fused gives what the XLA ops around a plain matmul give; the
  lowered program calls the kernel and nothing else for float32 activations."""
  from jinfer.models.fusion import MatmulFusion  # pylint: disable=g-import-not-at-top
  k, n = 96, 40
  w = _weight(mode, n, k)
  x = _normal(rows, 1, 2 * k if "swiglu" in part else k) * 2.0
  fusion = MatmulFusion(
      norm_weight=_normal(k) if part == "norm" else None, norm_eps=1e-5,
      swiglu="swiglu" in part, residual=_normal(rows, 1, n) if "residual" in part else None)
  fused = jax.jit(lambda x: _matmul(x, w, fusion))
  text = _lowered_text(lambda x: _matmul(x, w, fusion), x)
  assert "jinfer_matmul_" in text
  got = fused(x)
  x_in = fusion.input(x)
  want = fusion.output(jax.jit(lambda x: _matmul(x, w))(x_in))  # the same kernel, unfused
  atol = 2e-5
  if mode == "int4":  # inputs a rounding apart may take the next of the kernel's x levels
    d_MxK = np.repeat(np.abs(np.asarray(x_in)).reshape(rows, -1, 32).max(-1) / 127, 32, -1)
    atol += float(((d_MxK / 256) @ np.abs(np.asarray(w.dequantize())).T).max())
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=atol)
  if mode == "float32":  # and against XLA's own matmul
    np.testing.assert_allclose(got, fusion.output(_einsum(x_in, w)), rtol=1e-4, atol=1e-4)
  # The fused ops happen in the kernel (no exp/rsqrt/add ops left in the compiled program).
  compiled = jax.jit(lambda x: _matmul(x, w, fusion)).lower(x).compile().as_text()
  if mode != "w8a8":
    assert not re.search(r" (exponential|rsqrt|add)\(", compiled), compiled[-3000:]


@needs_kernels
def test_fusion_with_bfloat16_activations_stays_in_xla():
  """A bfloat16 model rounds between the norm, the matmul and the residual add: the kernel is
  called plain and XLA does those ops, so its rounding is the unfused path's."""
  from jinfer.models.fusion import MatmulFusion  # pylint: disable=g-import-not-at-top
  w = _normal(40, 96).astype(jnp.bfloat16)
  x = _normal(2, 1, 96).astype(jnp.bfloat16)
  fusion = MatmulFusion(norm_weight=_normal(96).astype(jnp.bfloat16), norm_eps=1e-5,
                        residual=_normal(2, 1, 40).astype(jnp.bfloat16))
  got = jax.jit(lambda x: _matmul(x, w, fusion))(x)
  want = fusion.output(jax.jit(lambda x: _matmul(x, w))(fusion.input(x)))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.astype(jnp.float32), want.astype(jnp.float32))


@needs_kernels
def test_decode_step_runs_no_xla_op_between_layer_kernels(tiny_model):
  """With the norms, SwiGLU and residual adds fused, a decode step's compiled program is its
  kernels plus a fixed handful of XLA ops (embedding, final norm), however many layers."""
  from jinfer.models import llama  # pylint: disable=g-import-not-at-top
  counts = {}
  for layers in (2, 4):
    config = dataclasses.replace(tiny_model.config, n_layers=layers)
    params = llama.init_params(config, jax.random.key(0))
    cache = KVCache.init(config, 1, 16)
    step = lambda p, c: llama.forward(p, config, jnp.ones((1, 1), jnp.int32),
                                      jnp.full((1, 1), 3, jnp.int32), c)
    hlo = jax.jit(step).lower(params, cache).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    counts[layers] = (entry.count("custom-call("), entry.count(" fusion("))
  assert counts[4][0] - counts[2][0] == 2 * 5  # q/k/v, attention, output, gate/up, down
  assert counts[4][1] == counts[2][1], counts  # no fusion per layer


@needs_kernels
def test_kernels_called_from_several_threads_at_once_stay_correct():
  """The kernels share one set of spinning helper threads: a kernel that finds them busy runs
  alone, and a helper that went to sleep between calls is woken. Results must not mix."""
  import threading
  import time
  w = _normal(520, 192)  # rows split between threads, not a multiple of the 4-row tile
  fn = jax.jit(lambda x: cpu_kernels.float_matmul(x, w, fallback=_wrong(x[..., :1] * w[:, 0])))
  inputs = [_normal(1 + i % 3, 1, 192) for i in range(8)]
  wants = [_einsum(x, w) for x in inputs]
  failures = []

  def run(i):
    for step in range(15):
      if step % 5 == 4:
        time.sleep(0.002)  # longer than the helpers spin: they sleep and must be woken
      got = fn(inputs[i])
      if not np.allclose(got, wants[i], rtol=1e-5, atol=1e-4):
        failures.append((i, step))

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not failures


@pytest.mark.parametrize("x_shape,w_shape", [
    ((17, 1, 64), (32, 64)),  # more rows than MAX_ROWS (a prefill): XLA's GEMM
    ((2, 1, 48), (32, 48)),  # K not a multiple of 32
])
@needs_kernels
def test_falls_back_to_xla_where_the_kernel_does_not_apply(x_shape, w_shape):
  x, w = _normal(*x_shape), _normal(*w_shape)
  fn = lambda x, w: cpu_kernels.float_matmul(x, w, fallback=lambda: _einsum(x, w) + 1.0)
  assert "jinfer_matmul_" not in _lowered_text(fn, x, w)
  np.testing.assert_allclose(jax.jit(fn)(x, w), _einsum(x, w) + 1.0, rtol=1e-6)


@needs_kernels
def test_int8_groups_not_divisible_by_32_fall_back():
  w = qw.quantize(_normal(16, 96), "int8", group_size=48)
  x = _normal(1, 1, 96)
  assert "jinfer_matmul_" not in _lowered_text(qw.linear, x, w)
  np.testing.assert_allclose(qw.linear(x, w), _einsum(x, w.dequantize()), rtol=1e-5, atol=1e-5)


def _unfused_decode(qkv_BxKxG2xH, rope, k_BxKxSxH, v_BxKxSxH, positions_B):
  """XLA's path for one decode step: RoPE, the cache scatter, then attention."""
  cache = KVCache(k=(k_BxKxSxH,), v=(v_BxKxSxH,))
  q, k, v = rope.split_qkv(qkv_BxKxG2xH[:, None])
  cache = cache.write(0, k, v, positions_B[:, None])
  return cache.attend(0, q, positions_B[:, None])[:, 0], cache.k[0], cache.v[0]


def _wrong_decode(qkv_BxKxG2xH, k, v):
  """decode_rope_attention's fallback, with an output a test would reject."""
  b, kv_heads, g2, h = qkv_BxKxG2xH.shape
  return lambda: (jnp.full((b, kv_heads * (g2 - 2), h), jnp.nan, qkv_BxKxG2xH.dtype), k, v)


def _decode_inputs(batch, kv_heads, groups, slots, head_dim, positions, dtype):
  qkv = _normal(batch, kv_heads, groups + 2, head_dim).astype(dtype)
  k, v = (_normal(batch, kv_heads, slots, head_dim).astype(dtype) for _ in "kv")
  positions = jnp.asarray(positions, jnp.int32)
  rope = Rope.at(positions[:, None], np.linspace(1.0, 1e-3, head_dim // 2, dtype=np.float32))
  return qkv, rope, k, v, positions


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_rope_attention_matches_the_unfused_path(dtype):
  """RoPE, the cache write and attention in one kernel equal XLA's three steps: the first slot
  only, the middle, the whole cache; a padding row (-1) and a row past the cache (S) write
  nothing, as the scatter's mode="drop"."""
  positions = [0, 9, 39, 25, -1, 40]
  qkv, rope, k, v, positions = _decode_inputs(6, 2, 3, 40, 64, positions, dtype)
  fused = lambda qkv, cos, sin, k, v, p: cpu_kernels.decode_rope_attention(
      qkv, cos, sin, k, v, p, fallback=_wrong_decode(qkv, k, v))
  args = (qkv, rope.cos_BxTxHh[:, 0], rope.sin_BxTxHh[:, 0], k, v, positions)
  assert "jinfer_decode_rope_attention" in _lowered_text(fused, *args)
  got_out, got_k, got_v = jax.jit(fused)(*args)
  want_out, want_k, want_v = _unfused_decode(qkv, rope, k, v, positions)
  assert got_out.dtype == dtype and got_k.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  # Row 4's output is discarded padding; row 5 (past the cache) sees the whole old cache.
  live = np.array([0, 1, 2, 3, 5])
  np.testing.assert_allclose(got_out[live].astype(jnp.float32),
                             want_out[live].astype(jnp.float32), atol=tolerance)
  np.testing.assert_allclose(got_k.astype(jnp.float32), want_k.astype(jnp.float32), atol=tolerance)
  np.testing.assert_array_equal(got_v, want_v)  # v is stored as given: bit-exact
  # Rows -1 and S write nothing.
  np.testing.assert_array_equal(got_k[4:], k[4:])
  np.testing.assert_array_equal(got_v[4:], v[4:])


@needs_kernels
@pytest.mark.parametrize("kv_heads,groups,slots,head_dim,positions", [
    (2, 6, 40, 64, [0, 30, 17]), (2, 9, 40, 32, [0, 30, 17]), (2, 2, 40, 80, [0, 30, 17]),
    (2, 3, 40, 16, [0, 30, 17]), (2, 1, 40, 48, [0, 30, 17]), (2, 2, 40, 40, [0, 30, 17]),
    (2, 2, 40, 36, [0, 30, 17]),
    (3, 2, 700, 64, [699, 450])])  # the last: enough cache for the threaded path
def test_decode_attention_shapes_beyond_the_common_one(kv_heads, groups, slots, head_dim,
                                                       positions):
  """Query heads past the 8 held in registers (in blocks), 5-8 heads (values loaded per 4),
  head dims that are not multiples of 64 (column tiles), dims off the 16-lane (AVX-512) and
  8-lane (AVX2) paths, and a long context split across threads."""
  qkv, rope, k, v, positions = _decode_inputs(len(positions), kv_heads, groups, slots,
                                               head_dim, positions, jnp.float32)
  got = jax.jit(lambda *a: cpu_kernels.decode_rope_attention(
      *a, fallback=_wrong_decode(qkv, k, v)))(
          qkv, rope.cos_BxTxHh[:, 0], rope.sin_BxTxHh[:, 0], k, v, positions)
  want = _unfused_decode(qkv, rope, k, v, positions)
  for got_x, want_x in zip(got, want):
    np.testing.assert_allclose(got_x, want_x, atol=1e-5)


@needs_kernels
def test_decode_rope_attention_writes_the_cache_in_place():
  """Inside a decode loop the caches are aliased to the kernel's outputs: no copy of a
  cache-sized buffer, each step writes its slots in place."""
  qkv, rope, k, v, positions = _decode_inputs(2, 2, 3, 512, 64, [5, 100], jnp.float32)

  def loop(k, v):
    def body(i, carry):
      k, v, total = carry
      out, k, v = cpu_kernels.decode_rope_attention(
          qkv + i, rope.cos_BxTxHh[:, 0], rope.sin_BxTxHh[:, 0], k, v, positions + i,
          fallback=_wrong_decode(qkv, k, v))
      return k, v, total + out.sum()
    return jax.lax.fori_loop(0, 4, body, (k, v, 0.0))

  hlo = jax.jit(loop, donate_argnums=(0, 1)).lower(k, v).compile().as_text()
  assert "jinfer_decode_rope_attention" in hlo
  assert "output_to_operand_aliasing" in hlo
  # No cache-sized copy anywhere (the donated caches are the loop's and the kernel's buffers).
  assert not re.search(r"= f32\[2,2,512,64\]\{[0-9,]*\} copy\(", hlo)
  got_k, got_v, _ = jax.jit(loop)(k, v)
  want_k, want_v = k, v
  for i in range(4):  # each step wrote its own slot
    _, want_k, want_v = _unfused_decode(qkv + i, rope, want_k, want_v, positions + i)
  np.testing.assert_allclose(got_k, want_k, atol=1e-5)
  np.testing.assert_array_equal(got_v, want_v)


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_decode_rope_attention_matches_the_unfused_path(dtype):
  """Against PagedKVCache's XLA path (RoPE, scatter, gather every page, mask): shuffled pages,
  NaN in every page no row holds, a row on a NO_PAGE entry (its write dropped, zeros read), a
  padding row (-1), and rows 3-5 the consecutive tokens of one sequence sharing a table (an
  engine's packed prefill: each token must see the ones before it, written in the same call)."""
  from jinfer.cache.paged_kv_cache import PagedKVCache  # pylint: disable=g-import-not-at-top
  kv_heads, groups, page_size, head_dim, num_pages = 2, 3, 4, 64, 14
  tables = np.array([[7, 2, 9, 0], [5, 11, -1, -1], [3, -1, -1, -1], [12, 13, -1, -1],
                     [12, 13, -1, -1], [12, 13, -1, -1], [1, -1, -1, -1]], np.int32)
  positions = jnp.array([13, 9, 0, 4, 5, 6, -1])
  qkv = _normal(7, kv_heads, groups + 2, head_dim).astype(dtype)
  rope = Rope.at(positions[:, None], np.linspace(1.0, 1e-3, head_dim // 2, dtype=np.float32))
  pool = lambda: np.array(_normal(kv_heads, num_pages, page_size, head_dim))
  k_pages, v_pages = pool(), pool()
  unused = [p for p in range(num_pages) if p not in tables]
  k_pages[:, unused], v_pages[:, unused] = np.nan, np.nan
  k_pages, v_pages = jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype)
  cache = PagedKVCache(k_pages=(k_pages,), v_pages=(v_pages,), k_scales=(), v_scales=(),
                       page_tables=jnp.asarray(tables), lengths=jnp.maximum(positions, 0))
  q, k, v = rope.split_qkv(qkv[:, None])
  want_cache = cache.write(0, k, v, positions[:, None])
  want = want_cache._gather_attend(0, q, positions[:, None])[:, 0]
  fn = lambda *a: cpu_kernels.paged_decode_rope_attention(
      *a, fallback=_wrong_decode(qkv, k_pages, v_pages))
  args = (qkv, rope.cos_BxTxHh[:, 0], rope.sin_BxTxHh[:, 0], k_pages, v_pages,
          jnp.asarray(tables), positions)
  assert "jinfer_paged_decode_rope_attention" in _lowered_text(fn, *args)
  got, got_k, got_v = jax.jit(fn)(*args)
  assert got.dtype == dtype and bool(jnp.isfinite(got[:6].astype(jnp.float32)).all())
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got[:6].astype(jnp.float32), want[:6].astype(jnp.float32),
                             atol=tolerance)
  used = sorted({int(p) for p in tables.ravel() if p >= 0})
  np.testing.assert_allclose(got_k[:, used].astype(jnp.float32),
                             want_cache.k_pages[0][:, used].astype(jnp.float32), atol=tolerance)
  np.testing.assert_array_equal(got_v[:, used], want_cache.v_pages[0][:, used])
  # The write through the cache advances the rows' lengths as `write` does.
  view = cache.replace(lengths=jnp.zeros_like(cache.lengths))
  _, fused_cache = view.write_and_attend(0, qkv[:, None], rope, positions[:, None])
  np.testing.assert_array_equal(fused_cache.lengths, view.write(0, k, v, positions[:, None]).lengths)


@needs_kernels
def test_model_decode_equals_decode_without_kernels(tiny_model):
  """Greedy decode through the kernels gives the tokens XLA's own ops give (kernels off in a
  subprocess, since the choice is made when the kernels are first loaded)."""
  prompts = [[5, 9, 2, 7], [11, 3]]
  params = jinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
  with_kernels = [o.token_ids for o in jinfer.generate(tiny_model, prompts, params)]
  script = (
      "import jinfer\n"
      "from jinfer.cpu_kernels import build\n"
      "assert not build.load()\n"
      "model = jinfer.model.random_model('tiny-gqa', seed=0)\n"
      f"params = jinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)\n"
      f"print([o.token_ids for o in jinfer.generate(model, {prompts}, params)])\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, build.DISABLE_ENV: "0"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == str(with_kernels)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
  """load() recomputed in an empty cache dir; the process's registration is restored after."""
  monkeypatch.setenv("JINFER_CACHE_DIR", str(tmp_path))
  build.load.cache_clear()
  yield
  build.load.cache_clear()
  monkeypatch.undo()
  assert build.load()


@needs_kernels
def test_no_compiler_disables_kernels_with_a_warning(fresh_build, monkeypatch, caplog):
  monkeypatch.setattr(build, "_compiler", lambda: None)
  with caplog.at_level(logging.WARNING):
    assert not build.load()
  assert "kernels disabled (no C++ compiler found; install g++ or set CXX)" in caplog.text


@needs_kernels
def test_failed_compile_disables_kernels_with_the_compiler_error(fresh_build, monkeypatch, caplog,
                                                                 tmp_path):
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++;\n")
  monkeypatch.setattr(build, "SOURCE", broken)
  with caplog.at_level(logging.WARNING):
    assert not build.load()
  assert "kernels disabled" in caplog.text and "broken.cc" in caplog.text
  assert not list(tmp_path.glob("cpu_kernels/*.so"))  # nothing half-built is left to load


@needs_kernels
def test_build_is_cached_per_source_and_machine(fresh_build, tmp_path):
  path = build.compiled_library()
  assert path == build.library_path(build._compiler()) and path.parent == tmp_path / "cpu_kernels"
  built_at = path.stat().st_mtime_ns
  assert build.compiled_library() == path and path.stat().st_mtime_ns == built_at  # reused
  assert list(path.parent.iterdir()) == [path]  # the temporary build directory is gone
