r"""Paged attention at long context: decode bandwidth, and chunked prefill over paged context.

  python -m pallas_kernels.paged_attention.benchmark --batch=8 --context_lens=512,2048,8192
  python -m pallas_kernels.paged_attention.benchmark --prefill --model=smollm2-135m-instruct

Decode (the default): one query token per row over `context_len` cached tokens in random,
non-contiguous pages. Times the platform's Pallas kernel (compiled, TPU/GPU only) and the XLA
reference, and prints the K/V bytes each call must read (the pages up to each row's length), the
achieved bandwidth (bytes / time) and its fraction of the device's peak (where the peak is known
or given with --peak_gbps). Decode attention reads every cached byte once per step, so the
fraction of peak is the figure of merit. Kernel rows carry their max error against the XLA
reference; with --interpret, platforms without a compiled kernel (CPU) also run both kernels in
Pallas interpret mode, untimed, for that error alone.

--prefill: a chunk of new tokens attending over paged context, through `PagedKVCache.attend`
(gather the pages into a contiguous view, then XLA attention) against the same attention over a
contiguous `KVCache`; the ratio is what the gather costs. On TPU/GPU the ragged paged-attention
kernel (`pallas_kernels.ragged_attention`, reading the pages in place) is timed on the same
chunks (with --interpret on CPU it runs untimed, for its error alone). Then whole-model prefill
of a prompt through `llama.forward` with each cache, in one shot and in chunks.

Times are the median of `--repeats` runs after a warm-up (compile) run. On CPU the kernels run
only in Pallas interpret mode, which is not a performance number: only the XLA paths are timed.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jinfer.cache import KVCache, PagedKVCache, page_table_array, pages_for
from jinfer.models import config as config_lib
from jinfer.models import llama
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_attention import ragged_paged_attention

# HBM bandwidth in GB/s by device kind (FACTS.md), matched as lowercase substrings in this order
# ("v5 lite" is v5e, a bare "v5" is v5p). No CPU entry: CPUs differ tenfold, so on CPU the
# fraction of peak is printed only with --peak_gbps.
PEAK_GBPS = (("h200", 4800.0), ("h100", 3350.0), ("v6 lite", 1640.0), ("v6e", 1640.0),
             ("v5 lite", 819.0), ("v5e", 819.0), ("v5p", 2760.0), ("v5", 2760.0),
             ("v4", 1200.0))
KERNEL_PLATFORMS = ("tpu", "gpu")
CPU_NOTE = ("platform cpu: the Pallas kernels compile only for TPU/GPU and interpret mode is not "
            "a performance number; timing the XLA reference only.")
INTERPRET_SUFFIX = " (interpret)"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure. Decode uses `batch`; prefill attention uses `prefill_batch`."""

  batch: int = 8
  context_lens: tuple[int, ...] = (512, 2048, 8192)
  num_kv_heads: int = 8
  num_q_heads: int = 32
  head_dim: int = 128
  page_size: int = 16
  dtype: str = "bfloat16"
  peak_gbps: float | None = None  # None: looked up from the device kind
  repeats: int = 10
  tuning: tuple[tuple[str, int], ...] = ()  # kernel keyword args (pages_per_block, num_splits)
  chunk_sizes: tuple[int, ...] = (16, 64, 256)
  prefill_batch: int = 1
  prompt_len: int = 512
  model_chunk: int = 64
  model: str = ""  # also time whole-model prefill of this checkpoint (besides the tiny config)
  interpret: bool = False  # off TPU/GPU: run both kernels interpreted (untimed) for their error

  def quick(self) -> Settings:
    """Small sizes and few repeats: a smoke run that finishes in seconds on CPU."""
    return dataclasses.replace(self, batch=2, context_lens=(256, 1024), num_kv_heads=2,
                               num_q_heads=8, head_dim=128, repeats=2, chunk_sizes=(16, 64),
                               prompt_len=64, model_chunk=16)


# ----------------------------------------------------------------------------- shared helpers


def peak_gbps_for(device_kind: str) -> float | None:
  """The HBM peak of a JAX device kind ('NVIDIA H100 80GB HBM3', 'TPU v5 lite'), None if unknown."""
  kind = device_kind.lower()
  return next((gbps for name, gbps in PEAK_GBPS if name in kind), None)


def kv_bytes(lengths: Sequence[int], page_size: int, num_kv_heads: int, head_dim: int,
             dtype) -> int:
  """Bytes of K and V a decode step reads: every head of the pages up to each row's length."""
  tokens = sum(pages_for(int(n), page_size) * page_size for n in lengths)
  return 2 * tokens * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


def random_page_tables(rng: np.random.Generator, lengths: Sequence[int], page_size: int,
                       num_pages: int, max_pages: int) -> np.ndarray:
  """[B, max_pages] int32 tables of distinct pages drawn in random order from the pool.

  Scattered page ids make the kernels gather, as they do after a serving engine's pages have
  been freed and reused; contiguous tables would flatter them.
  """
  needed = [pages_for(int(n), page_size) for n in lengths]
  if sum(needed) > num_pages:
    raise ValueError(f"{sum(needed)} pages needed but the pool holds {num_pages}.")
  order = rng.permutation(num_pages)
  starts = np.cumsum([0] + needed)
  tables = [order[s:s + n].tolist() for s, n in zip(starts, needed)]
  return page_table_array(tables, max_pages)


def random_pool(key: jax.Array, num_kv_heads: int, num_pages: int, page_size: int,
                head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
  """Random k/v pages [K, P, S_page, H]."""
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  k_key, v_key = jax.random.split(key)
  return jax.random.normal(k_key, shape, dtype), jax.random.normal(v_key, shape, dtype)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` runs after one warm-up (compile) run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _pool_size(lengths: Sequence[int], page_size: int) -> int:
  """Pages for every row plus an eighth spare, so tables skip over unused pages."""
  needed = sum(pages_for(int(n), page_size) for n in lengths)
  return needed + max(1, needed // 8)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _fraction(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------- decode


def decode_inputs(s: Settings, context_len: int, seed: int = 0) -> tuple[jax.Array, ...]:
  """(q [B, N, H], k_pages, v_pages, page_tables [B, M], lengths [B]), every row full length."""
  lengths = [context_len] * s.batch
  num_pages = _pool_size(lengths, s.page_size)
  tables_BxM = random_page_tables(np.random.default_rng(seed), lengths, s.page_size, num_pages,
                                  pages_for(context_len, s.page_size))
  q_key, kv_key = jax.random.split(jax.random.key(seed))
  q_BxNxH = jax.random.normal(q_key, (s.batch, s.num_q_heads, s.head_dim), s.dtype)
  k_pages, v_pages = random_pool(kv_key, s.num_kv_heads, num_pages, s.page_size, s.head_dim,
                                 s.dtype)
  return (q_BxNxH, k_pages, v_pages, jnp.asarray(tables_BxM),
          jnp.asarray(lengths, jnp.int32))


def decode_impls(s: Settings, platform: str) -> dict[str, Callable]:
  """Jitted decode attention per implementation: XLA (the reference, first), then the platform
  kernel (TPU/GPU), or with `s.interpret` off TPU/GPU both kernels in interpret mode (named
  with INTERPRET_SUFFIX: checked against XLA, not timed).

  Jitting the wrappers moves input validation (which reads lengths on the host) to trace time.
  """
  impls = {"xla": jax.jit(functools.partial(paged_attention, backend="xla"))}
  if platform in KERNEL_PLATFORMS:
    impls[f"pallas-{platform}"] = jax.jit(
        functools.partial(paged_attention, backend=platform, **dict(s.tuning)))
  elif s.interpret:
    for backend in KERNEL_PLATFORMS:
      # num_splits is the GPU kernel's alone.
      tuning = {k: v for k, v in s.tuning if backend == "gpu" or k != "num_splits"}
      impls[f"pallas-{backend}{INTERPRET_SUFFIX}"] = jax.jit(functools.partial(
          paged_attention, backend=backend, interpret=True, **tuning))
  return impls


def bench_decode(s: Settings, *, platform: str, peak_gbps: float | None,
                 log: Callable[[str], None] = print,
                 impls: dict[str, Callable] | None = None) -> list[dict[str, Any]]:
  """One row per (context length, implementation); kernel rows carry their max error vs XLA
  (None on the XLA row), interpreted kernels no timing (None).

  impls: name -> fn(q, k_pages, v_pages, page_tables, lengths), "xla" among them; by default
  `decode_impls(s, platform)`.
  """
  impls = decode_impls(s, platform) if impls is None else impls
  rows = []
  for context_len in s.context_lens:
    args = decode_inputs(s, context_len)
    nbytes = kv_bytes(np.asarray(args[4]), s.page_size, s.num_kv_heads, s.head_dim, s.dtype)
    want = impls["xla"](*args).astype(jnp.float32)
    for name, fn in impls.items():
      log(f"decode {name} context {context_len} ...")
      error = None
      if name != "xla":
        error = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - want)))
      seconds = gbps = None
      if not name.endswith(INTERPRET_SUFFIX):
        seconds = median_seconds(functools.partial(fn, *args), s.repeats)
        gbps = nbytes / seconds / 1e9
      rows.append({"impl": name, "batch": s.batch, "context_len": context_len,
                   "time_us": None if seconds is None else seconds * 1e6, "kv_bytes": nbytes,
                   "gbps": gbps,
                   "peak_fraction": None if None in (gbps, peak_gbps) else gbps / peak_gbps,
                   "max_error": error})
  return rows


def _number(x: float | None, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def format_decode_table(rows: Sequence[dict[str, Any]]) -> str:
  """The decode rows as a Markdown table."""
  return _table(
      ["impl", "batch", "context", "time (us)", "K/V MB read", "GB/s", "of peak", "max err vs xla"],
      [[r["impl"], str(r["batch"]), str(r["context_len"]), _number(r["time_us"], ".1f"),
        f"{r['kv_bytes'] / 1e6:.2f}", _number(r["gbps"], ".2f"), _fraction(r["peak_fraction"]),
        _number(r["max_error"], ".2g")] for r in rows])


# ----------------------------------------------------------------------------- chunked prefill


def _attention_config(s: Settings) -> config_lib.LlamaConfig:
  """A one-layer config with the attention shapes of `s`, so the caches can be built."""
  return config_lib.LlamaConfig(vocab_size=1, d_model=s.num_q_heads * s.head_dim, n_layers=1,
                                n_heads=s.num_q_heads, n_kv_heads=s.num_kv_heads,
                                head_dim=s.head_dim, d_ff=1)


def prefill_caches(s: Settings, context_len: int, chunk: int,
                   seed: int = 0) -> tuple[PagedKVCache, KVCache]:
  """A paged cache of context + chunk tokens per row, and a contiguous one holding the same.

  The chunk's own K/V count as written, as when `attend` runs; both caches span M * S_page
  positions, so the two attentions do the same work and differ only by the gather.
  """
  lengths = [context_len + chunk] * s.prefill_batch
  num_pages, max_pages = _pool_size(lengths, s.page_size), pages_for(lengths[0], s.page_size)
  tables_BxM = random_page_tables(np.random.default_rng(seed), lengths, s.page_size, num_pages,
                                  max_pages)
  config = _attention_config(s)
  k_pages, v_pages = random_pool(jax.random.key(seed), s.num_kv_heads, num_pages, s.page_size,
                                 s.head_dim, s.dtype)
  paged = PagedKVCache.init(config, num_pages, s.page_size, s.prefill_batch, max_pages, s.dtype)
  paged = paged.replace(k_pages=(k_pages,), v_pages=(v_pages,)).with_page_tables(
      tables_BxM, lengths)
  k_BxKxSxH, v_BxKxSxH, _ = paged.keys_values(0)
  dense = KVCache.init(config, s.prefill_batch, max_pages * s.page_size, s.dtype)
  return paged, dense.replace(k=(k_BxKxSxH,), v=(v_BxKxSxH,))


@jax.jit
def _attend(cache, q_BxTxNxH, positions_BxT):
  return cache.attend(0, q_BxTxNxH, positions_BxT)


def ragged_kernel(s: Settings, platform: str) -> tuple[Callable | None, bool]:
  """(fn(paged cache, q [B, T, N, H]) -> [B, T, N, H] through the ragged kernel, timed?): the
  platform's compiled kernel, the TPU one interpreted with --interpret elsewhere, else None."""
  if platform in KERNEL_PLATFORMS:
    backend, interpret = platform, False
  elif s.interpret:
    backend, interpret = "tpu", True
  else:
    return None, False

  @jax.jit
  def run(paged: PagedKVCache, q_BxTxNxH: jax.Array) -> jax.Array:
    b, t = q_BxTxNxH.shape[:2]
    out_TxNxH = ragged_paged_attention(
        q_BxTxNxH.reshape(b * t, *q_BxTxNxH.shape[2:]), paged.k_pages[0], paged.v_pages[0],
        paged.page_tables, paged.lengths, jnp.arange(0, b * t + 1, t, dtype=jnp.int32),
        backend=backend, interpret=interpret)
    return out_TxNxH.reshape(q_BxTxNxH.shape)

  return run, not interpret


def bench_prefill_attention(s: Settings,
                            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Chunk attention over paged (gather + XLA) vs contiguous context, per (context, chunk); and
  the ragged kernel's time (None when interpreted or absent) and max error against contiguous."""
  kernel, timed = ragged_kernel(s, jax.default_backend())
  rows = []
  for context_len in s.context_lens:
    for chunk in s.chunk_sizes:
      log(f"prefill attention context {context_len} chunk {chunk} ...")
      paged, dense = prefill_caches(s, context_len, chunk)
      q_BxTxNxH = jax.random.normal(jax.random.key(1), (s.prefill_batch, chunk, s.num_q_heads,
                                                        s.head_dim), s.dtype)
      positions_BxT = jnp.broadcast_to(context_len + jnp.arange(chunk, dtype=jnp.int32),
                                       (s.prefill_batch, chunk))
      paged_fn = functools.partial(_attend, paged, q_BxTxNxH, positions_BxT)
      dense_fn = functools.partial(_attend, dense, q_BxTxNxH, positions_BxT)
      paged_s, dense_s = median_seconds(paged_fn, s.repeats), median_seconds(dense_fn, s.repeats)
      want = dense_fn().astype(jnp.float32)
      error = jnp.max(jnp.abs(paged_fn().astype(jnp.float32) - want))
      row = {"batch": s.prefill_batch, "context_len": context_len, "chunk": chunk,
             "paged_us": paged_s * 1e6, "contiguous_us": dense_s * 1e6,
             "ratio": paged_s / dense_s, "max_error": float(error), "kernel_us": None,
             "kernel_error": None}
      if kernel is not None:
        kernel_fn = functools.partial(kernel, paged, q_BxTxNxH)
        row["kernel_error"] = float(jnp.max(jnp.abs(kernel_fn().astype(jnp.float32) - want)))
        if timed:
          row["kernel_us"] = median_seconds(kernel_fn, s.repeats) * 1e6
      rows.append(row)
  return rows


def format_prefill_table(rows: Sequence[dict[str, Any]]) -> str:
  """The prefill (chunk over paged context) rows as a Markdown table."""
  return _table(
      ["batch", "context", "chunk", "paged (us)", "contiguous (us)", "paged / contiguous",
       "max diff", "ragged kernel (us)", "kernel / contiguous", "kernel max diff"],
      [[str(r["batch"]), str(r["context_len"]), str(r["chunk"]), f"{r['paged_us']:.1f}",
        f"{r['contiguous_us']:.1f}", f"{r['ratio']:.2f}", f"{r['max_error']:.2g}",
        _number(r["kernel_us"], ".1f"),
        _number(r["kernel_us"] and r["kernel_us"] / r["contiguous_us"], ".2f"),
        _number(r["kernel_error"], ".2g")]
       for r in rows])


_forward = jax.jit(llama.forward, static_argnums=1)


def prefill_seconds(params, config: config_lib.LlamaConfig, tokens_1xT: jax.Array, cache,
                    chunk: int, repeats: int) -> float:
  """Median time to prefill `tokens` into `cache` in chunks of `chunk` (a jit call per chunk)."""
  t = tokens_1xT.shape[1]
  positions_1xT = jnp.arange(t, dtype=jnp.int32)[None]

  def run():
    out = cache
    for start in range(0, t, chunk):
      logits, out = _forward(params, config, tokens_1xT[:, start:start + chunk],
                             positions_1xT[:, start:start + chunk], out)
    return logits, out

  return median_seconds(run, repeats)


def bench_model_prefill(name: str, params, config: config_lib.LlamaConfig, s: Settings,
                        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Batch-1 prefill of a `prompt_len` prompt through llama.forward, paged vs contiguous cache.

  Once in one shot and once in chunks of `model_chunk` (the last chunk may be shorter).
  """
  t = s.prompt_len
  dtype = params["final_norm"].dtype
  max_pages = pages_for(t, s.page_size)
  num_pages = _pool_size([t], s.page_size)
  tables_1xM = random_page_tables(np.random.default_rng(0), [t], s.page_size, num_pages, max_pages)
  paged = PagedKVCache.init(config, num_pages, s.page_size, 1, max_pages, dtype)
  paged = paged.with_page_tables(tables_1xM, [0])
  dense = KVCache.init(config, 1, max_pages * s.page_size, dtype)
  tokens_1xT = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, t)),
                           jnp.int32)
  rows = []
  for chunk in sorted({t, min(s.model_chunk, t)}, reverse=True):
    log(f"model prefill {name} chunk {chunk} ...")
    dense_s = prefill_seconds(params, config, tokens_1xT, dense, chunk, s.repeats)
    paged_s = prefill_seconds(params, config, tokens_1xT, paged, chunk, s.repeats)
    rows.append({"model": name, "prompt_len": t, "chunk": chunk, "paged_ms": paged_s * 1e3,
                 "contiguous_ms": dense_s * 1e3, "ratio": paged_s / dense_s})
  return rows


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
  """The whole-model prefill rows as a Markdown table."""
  return _table(
      ["model", "prompt", "chunk", "paged (ms)", "contiguous (ms)", "paged / contiguous"],
      [[r["model"], str(r["prompt_len"]), str(r["chunk"]), f"{r['paged_ms']:.2f}",
        f"{r['contiguous_ms']:.2f}", f"{r['ratio']:.2f}"] for r in rows])


# ----------------------------------------------------------------------------- entry points


def check_settings(s: Settings) -> None:
  """Rejects settings the measurement cannot use, naming the flag to change."""
  if s.num_q_heads % s.num_kv_heads:
    raise ValueError(f"--num_q_heads={s.num_q_heads} must be a multiple of "
                     f"--num_kv_heads={s.num_kv_heads}.")
  sizes = {"batch": s.batch, "prefill_batch": s.prefill_batch, "head_dim": s.head_dim,
           "page_size": s.page_size, "repeats": s.repeats, "prompt_len": s.prompt_len,
           "model_chunk": s.model_chunk, "min context_lens": min(s.context_lens, default=0),
           "min chunk_sizes": min(s.chunk_sizes, default=0)}
  bad = {k: v for k, v in sizes.items() if v < 1}
  if bad:
    raise ValueError(f"these settings must be positive: {bad}.")


def describe_device(s: Settings, log: Callable[[str], None]) -> tuple[str, float | None]:
  """Logs the device line; returns (platform, peak GB/s: --peak_gbps or looked up)."""
  platform, device_kind = jax.default_backend(), jax.devices()[0].device_kind
  peak_gbps = s.peak_gbps if s.peak_gbps is not None else peak_gbps_for(device_kind)
  peak = "unknown (pass --peak_gbps)" if peak_gbps is None else f"{peak_gbps:.0f} GB/s"
  log(f"device: {platform} / {device_kind}; peak bandwidth {peak}")
  return platform, peak_gbps


def run_decode(s: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Measures decode attention and logs the report; returns the rows."""
  check_settings(s)
  platform, peak_gbps = describe_device(s, log)
  if platform not in KERNEL_PLATFORMS:
    log(CPU_NOTE + (" The kernels run interpreted, untimed, for their error vs XLA."
                    if s.interpret else ""))
  rows = bench_decode(s, platform=platform, peak_gbps=peak_gbps, log=log)
  log(f"\ndecode attention, {s.dtype}, {s.num_q_heads} query / {s.num_kv_heads} KV heads of "
      f"{s.head_dim}, pages of {s.page_size}, random page tables; median of {s.repeats}:")
  log(format_decode_table(rows))
  return rows


def run_prefill(s: Settings, log: Callable[[str], None] = print) -> dict[str, list]:
  """Measures chunk attention and whole-model prefill, logs the report; returns the rows."""
  check_settings(s)
  describe_device(s, log)
  attention_rows = bench_prefill_attention(s, log=log)
  log(f"\nchunk attention over paged context (PagedKVCache.attend: gather + XLA) vs contiguous "
      f"(KVCache.attend), {s.dtype}, {s.num_q_heads} query / {s.num_kv_heads} KV heads of "
      f"{s.head_dim}, pages of {s.page_size}; median of {s.repeats}:")
  log(format_prefill_table(attention_rows))
  models = [("tiny-gqa", config_lib.TINY_GQA,
             llama.init_params(config_lib.TINY_GQA, jax.random.key(0)))]
  if s.model:
    import jinfer  # pylint: disable=g-import-not-at-top  (only loaded when asked for)
    model = jinfer.load_model(s.model, dtype="float32")
    models.append((s.model, model.config, model.params))
  model_rows = []
  for name, config, params in models:
    model_rows += bench_model_prefill(name, params, config, s, log=log)
  log(f"\nwhole-model prefill (llama.forward, float32, batch 1), paged vs contiguous cache; "
      f"median of {s.repeats}:")
  log(format_model_table(model_rows))
  return {"attention": attention_rows, "model": model_rows}


def _define_flags() -> None:
  """The command line's flags, defined only when run as a script: jinfer.benchmark defines some
  of the same names, and tests import both modules."""
  flags.DEFINE_integer("batch", 8, "Decode batch rows.")
  flags.DEFINE_list("context_lens", ["512", "2048", "8192"], "Cached tokens per row.")
  flags.DEFINE_integer("num_kv_heads", 8, "KV heads.")
  flags.DEFINE_integer("num_q_heads", 32, "Query heads (a multiple of KV heads).")
  flags.DEFINE_integer("head_dim", 128, "Head dim (the TPU kernel needs 128k).")
  flags.DEFINE_integer("page_size", 16, "Tokens per page.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Q/K/V dtype.")
  flags.DEFINE_float(
      "peak_gbps", None, "Peak memory bandwidth in GB/s; default: looked up from the device kind "
      "(H100 3350, H200 4800, TPU v4 1200, v5e 819, v5p 2760, v6e 1640; none for CPUs).")
  flags.DEFINE_integer("repeats", 10, "Timed runs after a warm-up; the median is kept.")
  flags.DEFINE_integer("pages_per_block", None,
                       "Kernel tuning: pages per grid step (default: kernel's).")
  flags.DEFINE_integer("num_splits", None,
                       "GPU kernel tuning: split-K programs per (row, KV head).")
  flags.DEFINE_bool(
      "prefill", False, "Measure chunked prefill over paged context instead of decode.")
  flags.DEFINE_list("chunk_sizes", ["16", "64", "256"], "--prefill: new tokens per chunk.")
  flags.DEFINE_integer("prefill_batch", 1, "--prefill: rows per chunk call.")
  flags.DEFINE_integer("prompt_len", 512, "--prefill: whole-model prompt length.")
  flags.DEFINE_integer("model_chunk", 64, "--prefill: whole-model chunk size.")
  flags.DEFINE_string(
      "model", "", "--prefill: also time whole-model prefill of this checkpoint (e.g. "
      "smollm2-135m-instruct) besides the tiny random config.")
  flags.DEFINE_bool(
      "interpret", False, "On CPU: also run the TPU and GPU kernels in Pallas interpret mode "
      "(slow, untimed) and report their max error against the XLA reference.")
  flags.DEFINE_bool("quick", False, "Small sizes, 2 repeats: a smoke run (overrides sizes).")


def settings_from_flags() -> Settings:
  """The Settings the flags ask for (reduced by --quick)."""
  f = flags.FLAGS
  tuning = {"pages_per_block": f.pages_per_block, "num_splits": f.num_splits}
  s = Settings(
      batch=f.batch, context_lens=tuple(int(n) for n in f.context_lens),
      num_kv_heads=f.num_kv_heads, num_q_heads=f.num_q_heads, head_dim=f.head_dim,
      page_size=f.page_size, dtype=f.dtype, peak_gbps=f.peak_gbps, repeats=f.repeats,
      tuning=tuple((k, v) for k, v in tuning.items() if v is not None),
      chunk_sizes=tuple(int(n) for n in f.chunk_sizes), prefill_batch=f.prefill_batch,
      prompt_len=f.prompt_len, model_chunk=f.model_chunk, model=f.model, interpret=f.interpret)
  return s.quick() if f.quick else s


def main(argv):
  """Runs the decode benchmark, or the prefill one under --prefill."""
  del argv
  s = settings_from_flags()
  if flags.FLAGS.prefill:
    run_prefill(s)
  else:
    run_decode(s)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
