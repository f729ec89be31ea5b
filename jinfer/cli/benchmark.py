"""`jinfer benchmark`: decode throughput of jinfer and its peers, measured in one run.

  jinfer benchmark --batch_sizes=1,8 --dtypes=float32,bfloat16 --peers=transformers
  jinfer benchmark --batch_sizes=1 --dtypes=float32 --quantize=int8,w8a8,int4,int8kv \
      --perplexity --peers=none
  jinfer benchmark --batch_sizes=1,2,4,8,16 --plot_dir=plots

What is measured and how: jinfer/benchmark.py; the plots: jinfer/plots.py. Tables and log lines
go to stdout; the progress bar goes to stderr, and only when it is a terminal.
"""

import dataclasses
import json
import os
import sys

from absl import flags

from jinfer import cli

FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS) -> None:
  """Defines this command's flags in `flag_values` (absl's global FLAGS when it runs)."""
  flags = cli.bound_flags(flag_values)  # shadows absl.flags here: DEFINE_* into flag_values
  from jinfer import benchmark_check  # pylint: disable=g-import-not-at-top
  from jinfer.benchmark import DTYPES, KNOWN_PEERS, QUANT_FORMATS  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string(
      "model", "smollm2-135m-instruct",
      "Registry name, .gguf file, Hugging Face directory or jinfer Orbax checkpoint.")
  flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
  flags.DEFINE_list("dtypes", list(DTYPES), "jinfer dtypes: float32 and/or bfloat16.")
  flags.DEFINE_enum(
      "attention_impl", "auto", ["auto", "xla", "pallas"],
      "Decode attention: xla (contiguous cache), pallas (paged cache + Pallas kernel; "
      "interpreted, slow, on CPU) or auto (pallas on TPU/GPU, xla on CPU).")
  flags.DEFINE_integer("prompt_tokens", 64, "Prompt length in tokens.", lower_bound=1,
                       upper_bound=1 << 20)
  flags.DEFINE_integer("new_tokens", 128, "Tokens generated per sequence.", lower_bound=2)
  flags.DEFINE_list(
      "peers", ["transformers"], f"Peers to compare with: any of {list(KNOWN_PEERS)}, or 'none'.")
  flags.DEFINE_integer("repeats", 2, "Timed runs after the warm-up; the best is kept.",
                       lower_bound=1)
  flags.DEFINE_float(
      "bandwidth_gbps", None, "Memory bandwidth for the batch-1 roofline; by default the "
      "device's HBM peak on TPU/GPU and, on CPU, the read bandwidth measured at the start of "
      "the run.")
  flags.DEFINE_string("json_out", None, "Also write the results as JSON to this path.")
  flags.DEFINE_string(
      "check", None, "Decode mode: compare this run's ratios (fractions of the bandwidth "
      "ceiling, batch 8 / batch 1, int4 / int8, jinfer / peers) with the baseline JSON at this "
      "path (e.g. experiments/baselines/cpu_decode.json); exit 1 if any is more than "
      f"{benchmark_check.TOLERANCE:.0%} below, or if the run measured none of them.")
  flags.DEFINE_string(
      "record_baseline", None, "Decode mode: write this run's ratios as a baseline JSON to this "
      "path; an existing baseline of the same command keeps each ratio's lowest value (record "
      "3 runs).")
  flags.DEFINE_list(
      "speculative", [], "Also compare speculative decoding with these drafts (ngram, self).")
  flags.DEFINE_list("beam_widths", [], "Also time beam search at these widths (e.g. 1,2,4,8).")
  flags.DEFINE_list(
      "quantize", [], f"Also measure these quantized formats (any of {list(QUANT_FORMATS)}).")
  flags.DEFINE_bool(
      "perplexity", False, "Also measure the perplexity and parameter bytes of every format.")
  flags.DEFINE_list(
      "meshes", [], "Also measure float32 decode sharded over these data x model meshes, e.g. "
      "1x2,2x1 (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices).")
  flags.DEFINE_list(
      "prefill_lengths", [], "Measure prefill instead (jinfer/prefill_benchmark.py): time to "
      "first token of one prompt of each length, e.g. 512,2048,8000, against the peers.")
  flags.DEFINE_string(
      "plot_dir", None, "Also write a plot into this existing directory: decode.png by default "
      "(decode tok/s against batch size, one line per system and format, each with its roofline "
      "min(batch x bandwidth / weight bytes, measured matmul FLOP/s / (2 x params))); "
      "prefill.png with --prefill_lengths (prefill tok/s against prompt length); serving.png "
      "with --serving (CDFs of the engine's per-request TTFT and TPOT).")
  flags.DEFINE_bool(
      "progress", True, "Show a progress bar over the measured points on stderr (only when "
      "stderr is a terminal); --noprogress hides it.")
  flags.DEFINE_bool(
      "serving", False, "Measure serving instead (jinfer/engine/benchmark.py): the engine "
      "against static batching on a request workload, with TTFT/TPOT percentiles.")
  flags.DEFINE_integer("num_requests", 64, "--serving: requests in the workload.", lower_bound=1)
  flags.DEFINE_float("request_rate", float("inf"),
                     "--serving: Poisson arrival rate (requests/s); inf submits all at once.",
                     lower_bound=0)
  flags.DEFINE_integer("max_num_seqs", 64, "--serving: engine slots.", lower_bound=1)
  flags.DEFINE_integer("static_batch", 8, "--serving: batch size of the static batching rows.",
                       lower_bound=1)
  flags.DEFINE_integer("steps_per_call", 8, "--serving: engine decode steps per host call.",
                       lower_bound=1)


def _integers(flag: str) -> tuple[int, ...]:
  from jinfer.errors import InvalidRequestError  # pylint: disable=g-import-not-at-top
  values = FLAGS[flag].value
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise InvalidRequestError(f"--{flag} takes comma-separated integers, e.g. --{flag}=1,8; "
                              f"got {','.join(values)!r}.") from None


def mesh_shape(text: str) -> tuple[int, int]:
  """'2x4' -> (2, 4): data x model."""
  from jinfer.errors import InvalidRequestError  # pylint: disable=g-import-not-at-top
  data, _, tp = text.partition("x")
  try:
    return int(data), int(tp)
  except ValueError:
    raise InvalidRequestError(f"--meshes takes data x model shapes such as 1x2,2x1; got "
                              f"{text!r}.") from None


def main(argv) -> None:
  """Runs the benchmark mode the flags select and prints its tables (and plots, JSON)."""
  del argv
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer import benchmark, distributed, plots, sharding, validation  # pylint: disable=g-import-not-at-top
  from jinfer.checkpoints import registry  # pylint: disable=g-import-not-at-top
  log = tqdm.write  # print, but clears and redraws a progress bar around the line
  cfg = benchmark.BenchConfig(
      batch_sizes=_integers("batch_sizes"), dtypes=tuple(FLAGS.dtypes),
      prompt_tokens=FLAGS.prompt_tokens, new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats,
      bandwidth_gbps=FLAGS.bandwidth_gbps, quantize=tuple(FLAGS.quantize))
  beam_widths = _integers("beam_widths")
  # Everything is checked before the model loads and the (long) measurements start.
  benchmark.check_config(cfg, FLAGS.peers)
  validation.check_request(all(w >= 1 for w in beam_widths),
                           f"--beam_widths must be positive, got {list(beam_widths)}.")
  validation.check_request(
      all(m in benchmark.SPECULATIVE_METHODS for m in FLAGS.speculative),
      f"--speculative takes {list(benchmark.SPECULATIVE_METHODS)}, got {FLAGS.speculative}.")
  validation.check_request(
      FLAGS.bandwidth_gbps is None or validation.is_number(FLAGS.bandwidth_gbps)
      and FLAGS.bandwidth_gbps > 0, f"--bandwidth_gbps must be a finite number > 0 (or unset "
      f"to measure it), got {FLAGS.bandwidth_gbps}.")
  validation.check_request(FLAGS.plot_dir is None or os.path.isdir(FLAGS.plot_dir),
                           f"--plot_dir: directory {FLAGS.plot_dir!r} does not exist; create it "
                           "or write elsewhere.")
  if FLAGS.json_out:
    out_dir = os.path.dirname(os.path.abspath(FLAGS.json_out))
    validation.check_request(os.path.isdir(out_dir), f"--json_out: directory {out_dir!r} does "
                             "not exist; create it or write elsewhere.")
  from jinfer import benchmark_check  # pylint: disable=g-import-not-at-top
  baseline = None if FLAGS.check is None else benchmark_check.load_baseline(FLAGS.check)
  validation.check_request(
      (FLAGS.check is None and FLAGS.record_baseline is None)
      or not (FLAGS.serving or FLAGS.prefill_lengths),
      "--check and --record_baseline apply to the decode benchmark, not to --serving or "
      "--prefill_lengths.")
  if FLAGS.record_baseline:
    out_dir = os.path.dirname(os.path.abspath(FLAGS.record_baseline))
    validation.check_request(os.path.isdir(out_dir), f"--record_baseline: directory "
                             f"{out_dir!r} does not exist; create it or write elsewhere.")
  meshes = [mesh_shape(text) for text in FLAGS.meshes]
  prefill_lengths = _integers("prefill_lengths")
  validation.check_request(all(n >= 1 for n in prefill_lengths),
                           f"--prefill_lengths must be positive, got {list(prefill_lengths)}.")
  for data, tp in meshes:
    sharding.make_mesh({"data": data, "model": tp})  # enough devices?
  model = jinfer.load_model(FLAGS.model, dtype="float32", attention_impl=FLAGS.attention_impl)
  kind, path = registry.resolve(FLAGS.model)
  if FLAGS.serving:
    _serve(model, benchmark.PeerContext(kind, str(path), ()), log)
    return
  if prefill_lengths:
    from jinfer import prefill_benchmark  # pylint: disable=g-import-not-at-top
    with benchmark.progress_bar(len(prefill_lengths), "prefill", FLAGS.progress,
                                unit="length") as bar:
      results = prefill_benchmark.run_prefill(model, prefill_lengths, FLAGS.peers,
                                              benchmark.PeerContext(kind, str(path), ()),
                                              FLAGS.repeats, log, bar)
    print(prefill_benchmark.format_prefill(results))
    if FLAGS.plot_dir:
      print("wrote " + prefill_benchmark.plot_prefill(
          results, os.path.join(FLAGS.plot_dir, "prefill.png")))
    if FLAGS.json_out:
      with open(FLAGS.json_out, "w") as f:
        json.dump(results, f, indent=2)
    return
  ctx = benchmark.PeerContext(
      kind, str(path), tuple(benchmark.build_prompt_ids(model.tokenizer, cfg.prompt_tokens)))
  spec_prompts = (benchmark.speculative_prompts(model.tokenizer, cfg.prompt_tokens)
                  if FLAGS.speculative else {})
  formats = cfg.dtypes + cfg.quantize
  points = (benchmark.decode_points(cfg, FLAGS.peers) + len(meshes) * len(cfg.batch_sizes)
            + len(spec_prompts) * (1 + len(FLAGS.speculative)) + len(beam_widths)
            + (len(formats) if FLAGS.perplexity else 0))
  with benchmark.progress_bar(points, "decode benchmark", FLAGS.progress) as bar:
    results = benchmark.run_benchmark(model, cfg, FLAGS.peers, ctx, log, bar)
    if meshes:
      measured = dataclasses.replace(cfg, bandwidth_gbps=results["config"]["bandwidth_gbps"])
      results["rows"] += [dataclasses.asdict(r)
                          for r in benchmark.bench_meshes(model, measured, meshes, log, bar)]
    if FLAGS.speculative:
      results["speculative"] = benchmark.bench_speculative(
          model, spec_prompts, FLAGS.speculative, cfg.new_tokens, cfg.repeats, log, bar)
    if beam_widths:
      results["beam_search"] = benchmark.bench_beam_search(
          model, ctx.prompt_ids, beam_widths, cfg.new_tokens, cfg.repeats, log, bar)
    if FLAGS.perplexity:
      results["perplexity"] = benchmark.bench_perplexity(model, formats, log, progress=bar)
  if FLAGS.plot_dir:  # only then: the matmul measurement takes a few seconds
    log("compute ceiling: float32 matmul FLOP/s ...")
    results["compute_roofline"] = benchmark.compute_roofline(model)
  print(benchmark.report(results))
  if FLAGS.plot_dir:
    print("wrote " + plots.plot_decode(results, os.path.join(FLAGS.plot_dir, "decode.png"),
                                       FLAGS.model))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.json_out}")
  ratios = benchmark_check.run_ratios(results["rows"])
  if FLAGS.record_baseline:
    if distributed.is_main_process():  # one file, however many processes ran
      runs = benchmark_check.record(
          FLAGS.record_baseline, ratios, results["facts"],
          "jinfer benchmark " + " ".join(a for a in sys.argv[2:]
                                         if not a.startswith("--record_baseline")))
      print(f"wrote {FLAGS.record_baseline} (lowest ratios of {runs} runs of this command)")
  if baseline is not None:
    checked = benchmark_check.compare(ratios, baseline)
    print("\n" + benchmark_check.format_check(checked))
    if benchmark_check.regressions(checked):
      sys.exit(f"error: ratios regressed against {FLAGS.check}: "
               f"{', '.join(benchmark_check.regressions(checked))}.")
    if all(r["measured"] is None for r in checked):
      sys.exit(f"error: this run measured none of {FLAGS.check}'s ratios; run the command it "
               f"records.")


def _serve(model, ctx, log) -> None:
  from jinfer import benchmark, plots  # pylint: disable=g-import-not-at-top
  from jinfer.engine import benchmark as serving  # pylint: disable=g-import-not-at-top
  cfg = serving.ServingConfig(num_requests=FLAGS.num_requests, request_rate=FLAGS.request_rate,
                              max_num_seqs=FLAGS.max_num_seqs, static_batch=FLAGS.static_batch,
                              steps_per_call=FLAGS.steps_per_call)
  with benchmark.progress_bar(serving.serving_points(cfg, FLAGS.peers), "serving",
                              FLAGS.progress, unit="request") as bar:
    results = serving.run_serving(model, cfg, FLAGS.peers, ctx, log, bar)
  print(serving.format_serving(results))
  if FLAGS.plot_dir:
    print("wrote " + plots.plot_serving(results, os.path.join(FLAGS.plot_dir, "serving.png"),
                                        FLAGS.model))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.json_out}")
