r"""Decode throughput of jinfer and its peers, measured in one run on one machine.

  jinfer benchmark --batch_sizes=1,8 --dtypes=float32,bfloat16 --peers=transformers
  jinfer benchmark --batch_sizes=1 --dtypes=float32 --quantize=int8,w8a8,int4,int8kv \
      --perplexity --peers=none

Prints the machine facts, a markdown table (one row per system, dtype and batch size) and the
speedup of jinfer float32 batch 1 over transformers float32 batch 1 measured in the same run.
Every system decodes the same prompt token ids greedily for exactly `--new_tokens` tokens
(EOS ignored). Decode throughput counts the tokens after the first one (which prefill makes),
summed over the batch, divided by the decode time; the best of `--repeats` timed runs after
one warm-up (compile) run is kept.

The functions below take the model objects as arguments, so tests (and notebooks) can inject a
tiny model; `jinfer benchmark` (jinfer/cli/benchmark.py) only turns flags into calls.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

# Fixed English text the benchmark prompt is cut from (repeated when more tokens are needed).
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than any scribe. Within fifty years, presses were running in more "
    "than two hundred European cities, and millions of volumes had been printed. The spread of "
    "cheap books changed how people learned, argued and worshipped. Scientists shared results "
    "with distant colleagues, merchants kept better accounts, and ordinary readers could follow "
    "debates that had once been closed to them. Historians still disagree about how quickly these "
    "changes arrived, but few doubt that the press was one of the most important inventions of "
    "its age. ")

KNOWN_PEERS = ("transformers", "llama_cpp")
DTYPES = ("float32", "bfloat16")
# Quantized formats (activations float32, or ~15-bit integer codes in the int4 CPU kernel with
# AVX-512 VNNI or AVX2): weight modes of jinfer.quant.weights
# (the "-emb8" ones also quantize the embedding table / LM head to int8, as llama.cpp's files
# do), and "int8kv", float32 weights over an int8 KV cache.
QUANT_FORMATS = ("int8", "w8a8", "int4", "int8-emb8", "int4-emb8", "int8kv")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What to measure: shared by jinfer and every peer."""

  batch_sizes: tuple[int, ...] = (1, 8)
  dtypes: tuple[str, ...] = DTYPES
  prompt_tokens: int = 64
  new_tokens: int = 128
  repeats: int = 2
  # Memory bandwidth for the batch-1 roofline; None: measured in this run (`roofline_bandwidth`).
  bandwidth_gbps: Optional[float] = None
  quantize: tuple[str, ...] = ()  # QUANT_FORMATS measured besides `dtypes`


@dataclasses.dataclass
class Row:
  """One measured (system, dtype, batch) point. Times are the best of the timed repeats."""

  system: str
  dtype: str
  batch: int
  prompt_tokens: int
  new_tokens: int
  compile_s: Optional[float]  # None where the system has no compile step
  prefill_ms: float
  decode_tok_s: float  # tokens after the first, summed over the batch, per second
  ms_per_step: float  # one decode step for the whole batch
  weight_bytes: Optional[int] = None
  bandwidth_fraction: Optional[float] = None  # batch-1 rows: achieved / ceiling tok/s
  ceiling_tok_s: Optional[float] = None  # batch-1 rows: bandwidth / weight bytes
  note: str = ""


# ----------------------------------------------------------------------------- shared helpers


def machine_facts() -> dict[str, Any]:
  """Versions, JAX backend and device kind, and CPU count of this machine."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "cpu_model": cpu_model(),
  }


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` says."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def build_prompt_ids(tokenizer, prompt_tokens: int, text: str = PROMPT_TEXT) -> list[int]:
  """Exactly `prompt_tokens` token ids cut from fixed English text (repeated if too short)."""
  if prompt_tokens < 1:
    raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}.")
  ids = list(tokenizer.encode(text))
  if not ids:
    raise ValueError("the tokenizer turned the benchmark text into no tokens.")
  while len(ids) < prompt_tokens:
    ids += ids
  return ids[:prompt_tokens]


def weight_bytes(params) -> int:
  """Bytes of all arrays in a parameter pytree (codes and scales of quantized weights included):
  what batch-1 decode reads per step."""
  from jinfer.quant.weights import param_bytes  # pylint: disable=g-import-not-at-top
  return param_bytes(params)


def measured_read_gbps(nbytes: int = 512 << 20, seconds: float = 1.0, repeats: int = 3) -> float:
  """This machine's sustained memory read bandwidth in GB/s: numpy float32 matrix-vector
  products over an `nbytes` matrix (the installed multi-threaded BLAS streams it once each; the
  method FACTS.md used), back to back for `seconds`, best of `repeats`. Measured the way decode
  is (the best of a few runs of many steps), so their ratio is not flattered by a quiet moment.
  """
  w = np.ones((nbytes // (4 * 1024), 1024), np.float32)
  x = np.ones((1024,), np.float32)
  w @ x  # faults the pages in
  best = 0.0
  for _ in range(repeats):
    products, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or products == 0:
      w @ x
      products += 1
    best = max(best, products * w.nbytes / elapsed / 1e9)
  return best


def roofline_bandwidth(requested_gbps: Optional[float]) -> tuple[float, str]:
  """(GB/s, where it comes from) for the batch-1 ceiling: the requested figure, the device's
  HBM peak on TPU/GPU, or on CPU the read bandwidth measured now (so the fraction of the
  ceiling compares two figures from one run on one machine)."""
  import jax  # pylint: disable=g-import-not-at-top
  if requested_gbps is not None:
    return requested_gbps, "--bandwidth_gbps"
  if jax.default_backend() != "cpu":
    from pallas_kernels.paged_attention.benchmark import peak_gbps_for  # pylint: disable=g-import-not-at-top
    device_kind = jax.devices()[0].device_kind
    if (peak := peak_gbps_for(device_kind)) is not None:
      return peak, f"{device_kind} peak"
  return measured_read_gbps(), "numpy float32 GEMVs over 512 MB for 1 s, best of 3, this run"


def bandwidth_ceiling(nbytes: int, bandwidth_gbps: float) -> float:
  """Batch-1 decode tokens/s if every step read `nbytes` at `bandwidth_gbps` GB/s."""
  return bandwidth_gbps * 1e9 / nbytes


def param_count(params) -> int:
  """Number of elements of all arrays in a parameter pytree (of an unquantized model: its
  parameters, each one multiply-add per token)."""
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree.leaves(params)))


def measured_matmul_flops(n: int = 2048, seconds: float = 1.0, repeats: int = 3) -> float:
  """FLOP/s of float32 `n` x `n` matmuls in JAX on the default device (2 n^3 FLOPs each), back to
  back for `seconds`, best of `repeats`: an honest peak for the compute ceiling on a CPU, where no
  datasheet figure applies to XLA's code."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a_nn = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a_nn).block_until_ready()  # compiles
  best = 0.0
  for _ in range(repeats):
    products, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or products == 0:
      matmul(a_nn).block_until_ready()
      products += 1
    best = max(best, products * 2 * n**3 / elapsed)
  return best


def compute_ceiling(num_params: int, flops: float) -> float:
  """Decode tokens/s (summed over the batch) if every token's 2 FLOPs per parameter ran at
  `flops` FLOP/s: the same at every batch size."""
  return flops / (2 * num_params)


def roofline_tok_s(batch: int, nbytes: int, bandwidth_gbps: float,
                   compute_tok_s: Optional[float] = None) -> float:
  """Decode tokens/s a step of `batch` rows allows: it reads the weights once (so `batch` times
  the batch-1 bandwidth ceiling), capped by the compute ceiling when one is given."""
  memory_tok_s = batch * bandwidth_ceiling(nbytes, bandwidth_gbps)
  return memory_tok_s if compute_tok_s is None else min(memory_tok_s, compute_tok_s)


def compute_roofline(model, matmul_n: int = 2048, seconds: float = 1.0,
                     repeats: int = 3) -> dict[str, Any]:
  """The compute ceiling's figures for `model`, measured now: parameter count, matmul FLOP/s and
  where they come from (JSON-able; `jinfer.plots.plot_decode` draws it)."""
  flops = measured_matmul_flops(matmul_n, seconds, repeats)
  num_params = param_count(model.params)
  return {"param_count": num_params, "peak_flops": flops,
          "compute_tok_s": compute_ceiling(num_params, flops),
          "source": f"measured matmul FLOP/s: JAX float32 {matmul_n}x{matmul_n} for {seconds:g} "
                    f"s, best of {repeats}, this run"}


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "point"):
  """A tqdm bar over `total` measured points on stderr; a silent one when `enabled` is False or
  stderr is not a terminal (logs, pipes, tests), so redirected output holds no bar frames."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
              disable=not (enabled and sys.stderr.isatty()))


def advance(progress, n: int = 1) -> None:
  """Moves `progress` (a tqdm bar, or None for no bar) on by `n` measured points."""
  if progress is not None and n > 0:
    progress.update(n)


def make_row(system: str, dtype: str, batch: int, cfg: BenchConfig, *, compile_s, prefill_s,
             decode_s, nbytes: Optional[int] = None, note: str = "") -> Row:
  """Turns best-of timings into a Row; batch-1 rows with known weight bytes get roofline figures."""
  steps = cfg.new_tokens - 1
  tok_s = batch * steps / decode_s if decode_s > 0 else float("nan")
  row = Row(system=system, dtype=dtype, batch=batch, prompt_tokens=cfg.prompt_tokens,
            new_tokens=cfg.new_tokens, compile_s=compile_s, prefill_ms=prefill_s * 1e3,
            decode_tok_s=tok_s, ms_per_step=decode_s / steps * 1e3 if steps else float("nan"),
            weight_bytes=nbytes, note=note)
  if batch == 1 and nbytes:
    row.ceiling_tok_s = bandwidth_ceiling(nbytes, cfg.bandwidth_gbps)
    row.bandwidth_fraction = tok_s / row.ceiling_tok_s
  return row


def check_config(cfg: BenchConfig, peers: Sequence[str] = ()) -> None:
  """Rejects settings that would make the measurement meaningless, and unknown peers."""
  from jinfer.validation import check_request  # pylint: disable=g-import-not-at-top
  check_request(cfg.new_tokens >= 2, f"new_tokens must be >= 2 (decode starts after the first "
                f"token), got {cfg.new_tokens}.")
  check_request(cfg.repeats >= 1, f"repeats must be >= 1, got {cfg.repeats}.")
  check_request(bool(cfg.batch_sizes) and min(cfg.batch_sizes) >= 1,
                f"batch_sizes must be positive integers, got {cfg.batch_sizes}.")
  check_request(bool(cfg.dtypes) and all(d in DTYPES for d in cfg.dtypes),
                f"dtypes must be among {DTYPES}, got {cfg.dtypes}.")
  check_request(all(q in QUANT_FORMATS for q in cfg.quantize),
                f"quantize formats must be among {QUANT_FORMATS}, got {cfg.quantize}.")
  unknown = [p for p in peers if p != "none" and p not in KNOWN_PEERS]
  check_request(not unknown, f"unknown peers {unknown}; choose from {list(KNOWN_PEERS)} or 'none'.")


# ----------------------------------------------------------------------------- jinfer


def cast_model(model, dtype: str):
  """`model` with its floating weights in `dtype` (the same values load_model would give)."""
  from jinfer import model as model_lib  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(
      model, params=model_lib.cast_params(model.params, model_lib.resolve_dtype(dtype)))


def bench_jinfer_point(model, prompt_ids: Sequence[int], batch: int, cfg: BenchConfig,
                       dtype: str, system: str = "jinfer") -> Row:
  """Times jinfer's greedy generate on `batch` copies of the prompt: warm-up, then best of N."""
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  params = jinfer.SamplingParams(max_tokens=cfg.new_tokens, temperature=0.0, ignore_eos=True)
  prompts = [list(prompt_ids)] * batch
  _, warm = generate_with_stats(model, prompts, params)
  best_prefill, best_decode = math.inf, math.inf
  for _ in range(cfg.repeats):
    _, stats = generate_with_stats(model, prompts, params)
    expected = batch * (cfg.new_tokens - 1)
    if stats.generated_tokens != expected:
      raise RuntimeError(f"jinfer generated {stats.generated_tokens} decode tokens, expected "
                         f"{expected}; ignore_eos should make every row run to max_tokens.")
    best_prefill = min(best_prefill, stats.prefill_s)
    best_decode = min(best_decode, stats.decode_s)
  return make_row(system, dtype, batch, cfg, compile_s=warm.compile_s, prefill_s=best_prefill,
                  decode_s=best_decode, nbytes=weight_bytes(model.params))


def model_variant(model, name: str):
  """`model` as format `name`: a dtype (DTYPES) or a quantized format (QUANT_FORMATS)."""
  if name in DTYPES:
    return cast_model(model, name)
  model = cast_model(model, "float32")
  if name == "int8kv":
    return dataclasses.replace(model, kv_cache_dtype="int8")
  mode, _, embeddings = name.partition("-")
  return model.quantize(mode, embeddings=embeddings == "emb8")


def bench_jinfer(model, cfg: BenchConfig, log: Callable[[str], None] = print,
                 progress=None) -> list[Row]:
  """One Row per (format, batch size) for a jinfer Model: each dtype, then each quantized format."""
  prompt_ids = build_prompt_ids(model.tokenizer, cfg.prompt_tokens)
  rows = []
  for name in cfg.dtypes + cfg.quantize:
    variant = model_variant(model, name)
    for batch in cfg.batch_sizes:
      log(f"jinfer {name} batch {batch} ...")
      rows.append(bench_jinfer_point(variant, prompt_ids, batch, cfg, name))
      advance(progress)
    del variant
  return rows


def bench_meshes(model, cfg: BenchConfig, meshes: Sequence[tuple[int, int]],
                 log: Callable[[str], None] = print, progress=None) -> list[Row]:
  """float32 rows on each (data, model) mesh, named 'jinfer DxM' (the batch is padded to a
  multiple of the data axis; only real rows count)."""
  prompt_ids = build_prompt_ids(model.tokenizer, cfg.prompt_tokens)
  base = cast_model(model, "float32")
  rows = []
  for data, tp in meshes:
    sharded = base.shard({"data": data, "model": tp})
    for batch in cfg.batch_sizes:
      log(f"jinfer float32 mesh {data}x{tp} batch {batch} ...")
      rows.append(bench_jinfer_point(sharded, prompt_ids, batch, cfg, "float32",
                                     system=f"jinfer {data}x{tp}"))
      advance(progress)
    del sharded
  return rows


def bench_perplexity(model, names: Sequence[str], log: Callable[[str], None] = print,
                     text: Optional[str] = None, progress=None) -> list[dict]:
  """Perplexity on jinfer/data's text (or `text`) and parameter bytes of each format."""
  from jinfer import evaluate  # pylint: disable=g-import-not-at-top
  rows = []
  for name in names:
    log(f"jinfer {name} perplexity ...")
    variant = model_variant(model, name)
    rows.append({"format": name, "param_bytes": weight_bytes(variant.params),
                 "perplexity": evaluate.perplexity(variant, text, chunk_size=1024)})
    advance(progress)
  for row in rows:
    row["vs_first"] = row["perplexity"] / rows[0]["perplexity"] - 1
  return rows


def format_perplexity_table(rows: Sequence[dict]) -> str:
  """Markdown table of `bench_perplexity` rows (perplexity and MB per format)."""
  lines = ["| format | parameter MB | perplexity | vs " + rows[0]["format"] + " |",
           "|---|---|---|---|"]
  lines += [f"| {r['format']} | {r['param_bytes'] / 1e6:.1f} | {r['perplexity']:.4f} | "
            f"{r['vs_first']:+.2%} |" for r in rows]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- peers


@dataclasses.dataclass(frozen=True)
class PeerContext:
  """What a peer needs: the checkpoint (kind/path from registry.resolve) and the prompt ids."""

  checkpoint_kind: str  # 'gguf', 'hf' or 'orbax'
  checkpoint_path: str
  prompt_ids: tuple[int, ...]


class PeerUnavailable(Exception):
  """The peer cannot run here (package missing, unsupported checkpoint); the message says why."""


def load_transformers_model(ctx: PeerContext):
  """The same checkpoint as a float32 transformers model (a GGUF is dequantized on load)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise PeerUnavailable(f"{e}; install with `pip install torch==2.13.0 transformers accelerate` "
                          "(pin torch: other versions pull a CUDA build).") from e
  path = ctx.checkpoint_path
  if ctx.checkpoint_kind == "gguf":
    kwargs = dict(gguf_file=os.path.basename(path))
    path = os.path.dirname(path) or "."
  elif ctx.checkpoint_kind == "hf":
    kwargs = {}
  else:
    raise PeerUnavailable(f"transformers cannot read a {ctx.checkpoint_kind} checkpoint; "
                          "benchmark a .gguf file or a Hugging Face directory.")
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
  return model.eval()


def _torch_generate_seconds(torch_model, input_ids, new_tokens: int) -> float:
  """Wall time of one greedy `generate` of exactly `new_tokens` tokens with the KV cache."""
  import torch  # pylint: disable=g-import-not-at-top
  attention_mask = torch.ones_like(input_ids)
  eos = torch_model.generation_config.eos_token_id
  pad = eos[0] if isinstance(eos, (list, tuple)) else eos
  start = time.perf_counter()
  with torch.inference_mode():
    out = torch_model.generate(input_ids, attention_mask=attention_mask,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, use_cache=True,
                               pad_token_id=pad if pad is not None else 0)
  seconds = time.perf_counter() - start
  if out.shape[1] - input_ids.shape[1] != new_tokens:
    raise RuntimeError(f"transformers generated {out.shape[1] - input_ids.shape[1]} tokens, "
                       f"expected {new_tokens}.")
  return seconds


def bench_transformers_point(torch_model, prompt_ids: Sequence[int], batch: int,
                             cfg: BenchConfig) -> Row:
  """Times transformers on `batch` copies of the prompt; prefill is a separate 1-token run.

  decode tok/s = batch * (N - 1) / (best N-token time - best 1-token time).
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  input_ids = torch.tensor([list(prompt_ids)] * batch, dtype=torch.long)
  _torch_generate_seconds(torch_model, input_ids, cfg.new_tokens)  # warm-up
  prefill = min(_torch_generate_seconds(torch_model, input_ids, 1) for _ in range(cfg.repeats))
  total = min(_torch_generate_seconds(torch_model, input_ids, cfg.new_tokens)
              for _ in range(cfg.repeats))
  nbytes = sum(p.numel() * p.element_size() for p in torch_model.parameters())
  dtype = str(next(torch_model.parameters()).dtype).removeprefix("torch.")
  return make_row("transformers", dtype, batch, cfg, compile_s=None, prefill_s=prefill,
                  decode_s=total - prefill, nbytes=int(nbytes),
                  note=f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def bench_transformers(ctx: PeerContext, cfg: BenchConfig, log: Callable[[str], None] = print,
                       progress=None) -> list[Row]:
  """transformers float32 rows for every batch size."""
  torch_model = load_transformers_model(ctx)
  rows = []
  for batch in cfg.batch_sizes:
    log(f"transformers float32 batch {batch} ...")
    rows.append(bench_transformers_point(torch_model, ctx.prompt_ids, batch, cfg))
    advance(progress)
  return rows


def _llama_cpp_module():
  """The llama_cpp package, or PeerUnavailable saying how to install it."""
  try:
    import llama_cpp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise PeerUnavailable(
        "package llama_cpp is not importable; install it with `pip install llama-cpp-python` "
        "(compiles llama.cpp from source: about 5 minutes on 2 cores).") from e
  return llama_cpp


def _llama_cpp_generate_seconds(llm, prompt_ids: Sequence[int],
                                new_tokens: int) -> tuple[float, float]:
  """(time to the first token, total time) of greedy generation of `new_tokens` tokens.

  The low-level `Llama.generate` iterator never stops at EOS, so exactly `new_tokens` tokens
  come out; `reset()` first so no prefix of an earlier run is reused from the KV cache.
  """
  llm.reset()
  start = time.perf_counter()
  first = None
  count = 0
  for _ in llm.generate(list(prompt_ids), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
    count += 1
    if first is None:
      first = time.perf_counter() - start
    if count == new_tokens:
      break
  return first, time.perf_counter() - start


def bench_llama_cpp(ctx: PeerContext, cfg: BenchConfig, log: Callable[[str], None] = print,
                    progress=None) -> list[Row]:
  """llama.cpp batch-1 row on the GGUF's own (quantized) weights; larger batches are skipped."""
  llama_cpp = _llama_cpp_module()
  if ctx.checkpoint_kind != "gguf":
    raise PeerUnavailable(f"llama_cpp needs a .gguf file, got a {ctx.checkpoint_kind} checkpoint.")
  threads = os.cpu_count() or 1
  llm = llama_cpp.Llama(model_path=ctx.checkpoint_path,
                        n_ctx=cfg.prompt_tokens + cfg.new_tokens + 16, n_threads=threads,
                        n_batch=max(cfg.prompt_tokens, 8), verbose=False)
  log("llama_cpp batch 1 ...")
  _llama_cpp_generate_seconds(llm, ctx.prompt_ids, cfg.new_tokens)  # warm-up
  runs = [_llama_cpp_generate_seconds(llm, ctx.prompt_ids, cfg.new_tokens)
          for _ in range(cfg.repeats)]
  prefill = min(first for first, _ in runs)
  decode = min(total - first for first, total in runs)
  note = f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, {threads} threads"
  if any(b != 1 for b in cfg.batch_sizes):
    note += "; batch > 1 not measured (one sequence per Llama context)"
  advance(progress)
  return [make_row("llama_cpp", "gguf-native", 1, cfg, compile_s=None, prefill_s=prefill,
                   decode_s=decode, nbytes=os.path.getsize(ctx.checkpoint_path), note=note)]


# name -> runner(ctx, cfg, log, progress) -> rows; a runner raises PeerUnavailable when it cannot
# run here.
PEERS: dict[str, Callable[..., list[Row]]] = {
    "transformers": bench_transformers,
    "llama_cpp": bench_llama_cpp,
}


def peer_points(name: str, cfg: BenchConfig) -> int:
  """Measured points (progress bar steps) of peer `name`: llama_cpp measures batch 1 only."""
  return 0 if name == "none" else 1 if name == "llama_cpp" else len(cfg.batch_sizes)


def decode_points(cfg: BenchConfig, peers: Sequence[str]) -> int:
  """Measured points of `run_benchmark`: one per jinfer (format, batch size), and the peers'."""
  return (len(cfg.dtypes + cfg.quantize) * len(cfg.batch_sizes)
          + sum(peer_points(name, cfg) for name in peers))


def run_peers(peers: Sequence[str], ctx: Optional[PeerContext], cfg: BenchConfig,
              log: Callable[[str], None] = print,
              progress=None) -> tuple[list[Row], dict[str, str]]:
  """Rows of every requested peer, and {peer: why it was skipped} for those that could not run."""
  rows, skipped = [], {}
  for name in peers:
    if name == "none":
      continue
    check_config(cfg, [name])
    done_before = progress.n if progress is not None else 0
    if ctx is None:
      skipped[name] = "no checkpoint path to give it (the model was passed in memory)."
    else:
      try:
        rows += PEERS[name](ctx, cfg, log, progress)
      except PeerUnavailable as e:
        skipped[name] = str(e)
      except Exception as e:  # pylint: disable=broad-except  (keep the rows measured so far)
        skipped[name] = f"failed: {type(e).__name__}: {e}"
    if name in skipped:
      log(f"{name}: skipped: {skipped[name]}")
      # The points a skipped peer did not measure still count, so the bar ends full.
      if progress is not None:
        advance(progress, done_before + peer_points(name, cfg) - progress.n)
  return rows, skipped


# ----------------------------------------------------------------------------- results


def find_row(rows: Sequence[Row], system: str, dtype: str, batch: int) -> Optional[Row]:
  """The first row of `system` with this dtype and batch size, if measured."""
  return next((r for r in rows if (r.system, r.dtype, r.batch) == (system, dtype, batch)), None)


def speedup(rows: Sequence[Row], peer: str = "transformers") -> Optional[float]:
  """jinfer float32 batch-1 decode tok/s over `peer` float32 batch-1, or None if either is missing."""
  ours, theirs = find_row(rows, "jinfer", "float32", 1), find_row(rows, peer, "float32", 1)
  if ours is None or theirs is None or not theirs.decode_tok_s > 0:
    return None
  return ours.decode_tok_s / theirs.decode_tok_s


def _fmt(value, spec: str) -> str:
  """`value` formatted with `spec`, or '-' when missing."""
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
      value, spec)


def format_table(rows: Sequence[Row], bandwidth_gbps: float) -> str:
  """Markdown table of the rows."""
  header = ["system", "dtype", "batch", "compile s", "prefill ms", "decode tok/s", "ms/step",
            f"ceiling tok/s @{bandwidth_gbps:.1f} GB/s", "of ceiling", "notes"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r.system, r.dtype, str(r.batch), _fmt(r.compile_s, ".2f"), _fmt(r.prefill_ms, ".1f"),
             _fmt(r.decode_tok_s, ".1f"), _fmt(r.ms_per_step, ".2f"), _fmt(r.ceiling_tok_s, ".1f"),
             _fmt(r.bandwidth_fraction, ".0%"), r.note]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_facts(facts: dict[str, Any]) -> str:
  """One line of machine facts."""
  return ", ".join(f"{k}={v}" for k, v in facts.items())


def speedup_line(rows: Sequence[Row]) -> str:
  """The closing line: jinfer float32 batch 1 vs transformers float32 batch 1, this run."""
  ratio = speedup(rows)
  if ratio is None:
    return "speedup jinfer/transformers (float32, batch 1): not measured in this run"
  ours = find_row(rows, "jinfer", "float32", 1)
  theirs = find_row(rows, "transformers", "float32", 1)
  return (f"speedup jinfer/transformers (float32, batch 1): {ratio:.2f}x "
          f"({ours.decode_tok_s:.1f} vs {theirs.decode_tok_s:.1f} tok/s)")


def run_benchmark(model, cfg: BenchConfig, peers: Sequence[str] = ("transformers",),
                  peer_ctx: Optional[PeerContext] = None, log: Callable[[str], None] = print,
                  progress=None) -> dict[str, Any]:
  """Measures jinfer (`model`, any dtype; cast per row) and the peers; returns a JSON-able dict.

  Keys: facts, config, rows (list of Row dicts), skipped ({peer: reason}), speedup (or None).
  `progress` (a tqdm bar, see `progress_bar`) moves on by one per row, `decode_points` in all.
  """
  check_config(cfg)
  facts = machine_facts()
  gbps, source = roofline_bandwidth(cfg.bandwidth_gbps)
  facts["roofline_bandwidth"] = f"{gbps:.1f} GB/s ({source})"
  cfg = dataclasses.replace(cfg, bandwidth_gbps=gbps)
  rows = bench_jinfer(model, cfg, log, progress)
  peer_rows, skipped = run_peers(peers, peer_ctx, cfg, log, progress)
  rows += peer_rows
  return {"facts": facts, "config": dataclasses.asdict(cfg),
          "rows": [dataclasses.asdict(r) for r in rows], "skipped": skipped,
          "speedup": speedup(rows)}


def bench_beam_search(model, prompt_ids: Sequence[int], widths: Sequence[int], new_tokens: int,
                      repeats: int = 2, log: Callable[[str], None] = print,
                      progress=None) -> list[dict]:
  """Wall time of one beam search (EOS ignored, so every width runs `new_tokens` steps).

  Each row: width, seconds (best of `repeats` after a compiling warm-up), tokens/s counting the
  width x new_tokens tokens scored, and cost relative to the first width.
  """
  import jinfer  # pylint: disable=g-import-not-at-top
  rows = []
  for width in widths:
    log(f"jinfer beam search width {width} ...")
    params = jinfer.BeamSearchParams(beam_width=width, max_tokens=new_tokens, ignore_eos=True,
                                     early_stopping=True)
    jinfer.beam_search(model, [list(prompt_ids)], params)  # compile
    best = min(_timed(lambda: jinfer.beam_search(model, [list(prompt_ids)], params))
               for _ in range(repeats))
    rows.append({"width": width, "seconds": best, "beam_tok_s": width * new_tokens / best})
    advance(progress)
  for row in rows:
    row["relative_cost"] = row["seconds"] / rows[0]["seconds"]
  return rows


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


COPY_INSTRUCTION = "Repeat the following text exactly, word for word:\n\n"


def speculative_prompts(tokenizer, prompt_tokens: int) -> dict[str, list[int]]:
  """Two greedy workloads: free continuation of the benchmark text, and copying it (chat).

  Prompt-lookup drafts only help where the output repeats the context; the pair shows both.
  """
  text = tokenizer.decode(build_prompt_ids(tokenizer, prompt_tokens))
  copy = tokenizer.apply_chat_template([{"role": "user", "content": COPY_INSTRUCTION + text}])
  return {"continue": build_prompt_ids(tokenizer, prompt_tokens),
          "copy": tokenizer.encode(copy)}


# Draft methods `bench_speculative` can build without a second model.
SPECULATIVE_METHODS = ("ngram", "self")


def speculative_config(method: str, model, num_draft_tokens: int = 4):
  """The SpeculativeConfig `method` ("ngram", "self") stands for; "self" drafts with the
  first two thirds of the model's layers."""
  import jinfer  # pylint: disable=g-import-not-at-top
  if method == "self":
    return jinfer.SpeculativeConfig(method="self", num_draft_tokens=num_draft_tokens,
                                    draft_layers=(2 * model.config.n_layers) // 3)
  return jinfer.SpeculativeConfig(method=method, num_draft_tokens=num_draft_tokens)


def bench_speculative(model, prompts: dict[str, list[int]], methods: Sequence[str],
                      new_tokens: int, repeats: int = 2, log: Callable[[str], None] = print,
                      progress=None) -> list[dict]:
  """Greedy decode tok/s with and without speculative decoding, per workload and method."""
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  params = jinfer.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
  rows = []
  for name, ids in prompts.items():
    plain_tok_s = None
    for method in ["none", *methods]:
      log(f"jinfer speculative={method} on '{name}' ...")
      spec = None if method == "none" else speculative_config(method, model)
      runs = [generate_with_stats(model, [ids], params, speculative=spec)[1]
              for _ in range(repeats + 1)][1:]  # the first run compiles
      stats = min(runs, key=lambda st: st.decode_s)
      tok_s = stats.decode_tokens_per_s
      plain_tok_s = plain_tok_s or tok_s
      rows.append({"workload": name, "method": method, "decode_tok_s": tok_s,
                   "speedup": tok_s / plain_tok_s,
                   "acceptance": stats.acceptance_rate if spec else None,
                   "tokens_per_forward": stats.tokens_per_target_forward if spec else 1.0})
      advance(progress)
  return rows


def format_speculative_table(rows: Sequence[dict]) -> str:
  """Markdown table of `bench_speculative` rows."""
  lines = ["| workload | draft | decode tok/s | vs plain | acceptance | tokens per target forward |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
    lines.append(f"| {r['workload']} | {r['method']} | {r['decode_tok_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {acceptance} | {r['tokens_per_forward']:.2f} |")
  return "\n".join(lines)


def format_beam_table(rows: Sequence[dict]) -> str:
  """Markdown table of `bench_beam_search` rows."""
  lines = ["| beam width | seconds | beam tokens/s | cost vs first |", "|---|---|---|---|"]
  lines += [f"| {r['width']} | {r['seconds']:.2f} | {r['beam_tok_s']:.1f} | "
            f"{r['relative_cost']:.2f}x |" for r in rows]
  return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
  """The printed report: machine facts, table, skipped peers and the speedup line."""
  rows = [Row(**r) for r in results["rows"]]
  cfg = results["config"]
  parts = [f"machine: {format_facts(results['facts'])}",
           f"prompt {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens (greedy, EOS "
           f"ignored), best of {cfg['repeats']} after a warm-up; decode tok/s is summed over the "
           "batch", "", format_table(rows, cfg["bandwidth_gbps"]), ""]
  parts += [f"{name}: skipped: {why}" for name, why in results["skipped"].items()]
  parts.append(speedup_line(rows))
  if results.get("speculative"):
    parts += ["", f"speculative decoding, float32, batch 1, greedy, {cfg['new_tokens']} tokens:",
              format_speculative_table(results["speculative"])]
  if results.get("beam_search"):
    parts += ["", f"beam search, float32, batch 1, {cfg['new_tokens']} tokens:",
              format_beam_table(results["beam_search"])]
  if results.get("perplexity"):
    parts += ["", "perplexity on jinfer/data/alice_chapter1.txt (through the KV cache):",
              format_perplexity_table(results["perplexity"])]
  return "\n".join(parts)
