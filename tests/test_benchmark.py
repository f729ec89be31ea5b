"""Smoke tests of jinfer.benchmark on tiny models (no timing is asserted). The full smoke runs
are slow; the fast tier runs one point end to end and the table and bandwidth helpers."""

import dataclasses
import json
import math

import pytest

from jinfer import benchmark

ROW_KEYS = {f.name for f in dataclasses.fields(benchmark.Row)}
TINY = benchmark.BenchConfig(batch_sizes=(1, 2), dtypes=("float32", "bfloat16"), prompt_tokens=8,
                             new_tokens=4, repeats=1)


def _check_row(row: dict, system: str, batch: int, dtype: str):
  assert set(row) == ROW_KEYS
  assert (row["system"], row["batch"], row["dtype"]) == (system, batch, dtype)
  for key in ("prefill_ms", "decode_tok_s", "ms_per_step"):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row)
  assert row["weight_bytes"] > 0
  if batch == 1:
    assert math.isfinite(row["bandwidth_fraction"]) and row["bandwidth_fraction"] > 0
    assert row["ceiling_tok_s"] > 0
  else:
    assert row["bandwidth_fraction"] is None


def test_build_prompt_ids_has_exact_length(tiny_model):
  ids = benchmark.build_prompt_ids(tiny_model.tokenizer, 2000)
  assert len(ids) == 2000
  assert benchmark.build_prompt_ids(tiny_model.tokenizer, 5) == ids[:5]


def test_run_benchmark_one_point_with_a_given_bandwidth(tiny_model):
  cfg = dataclasses.replace(TINY, batch_sizes=(1,), dtypes=("float32",), bandwidth_gbps=25.0)
  results = benchmark.run_benchmark(tiny_model, cfg, peers=["none"], log=lambda _: None)
  assert results["facts"]["roofline_bandwidth"] == "25.0 GB/s (--bandwidth_gbps)"
  (row,) = results["rows"]
  _check_row(row, "jinfer", 1, "float32")
  assert row["ceiling_tok_s"] == pytest.approx(25e9 / row["weight_bytes"])
  assert benchmark.report(results).count("| jinfer |") == 1


def test_run_with_plot_dir_writes_decode_png(tiny_model, tmp_path, capsys):
  """What `jinfer benchmark --plot_dir` does after measuring, on the tiny model: the compute
  ceiling, then decode.png; the progress bar, off, writes nothing to stderr."""
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  from jinfer import plots  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(TINY, dtypes=("float32",), bandwidth_gbps=25.0)
  with benchmark.progress_bar(benchmark.decode_points(cfg, ["none"]), "decode",
                              enabled=False) as bar:
    results = benchmark.run_benchmark(tiny_model, cfg, peers=["none"], log=lambda _: None,
                                      progress=bar)
  assert capsys.readouterr().err == ""
  roofline = benchmark.compute_roofline(tiny_model, matmul_n=128, seconds=0.01, repeats=1)
  # float32: 4 bytes per parameter, so the weight bytes the table uses count the same params.
  assert roofline["param_count"] * 4 == results["rows"][0]["weight_bytes"]
  assert roofline["peak_flops"] > 0 and "measured matmul FLOP/s" in roofline["source"]
  assert roofline["compute_tok_s"] == pytest.approx(
      roofline["peak_flops"] / (2 * roofline["param_count"]))
  results["compute_roofline"] = roofline
  path = plots.plot_decode(results, str(tmp_path / "decode.png"), "tiny")
  assert image.imread(path).shape == (500, 800, 4)
  json.dumps(results)  # still JSON-able for --json_out


@pytest.mark.slow
def test_run_benchmark_on_tiny_model(tiny_model, tmp_path):
  logs = []
  results = benchmark.run_benchmark(tiny_model, TINY, peers=["none"], log=logs.append)
  assert set(results) == {"facts", "config", "rows", "skipped", "speedup"}
  assert results["facts"]["cpu_count"] >= 1 and results["facts"]["jax"]
  # The roofline uses the memory bandwidth measured in the same run.
  assert "GB/s (numpy float32 GEMVs" in results["facts"]["roofline_bandwidth"]
  assert results["config"]["bandwidth_gbps"] > 0
  assert [(r["dtype"], r["batch"]) for r in results["rows"]] == [
      ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
  for row in results["rows"]:
    _check_row(row, "jinfer", row["batch"], row["dtype"])
    assert row["compile_s"] >= 0
  f32, bf16 = results["rows"][0], results["rows"][2]
  assert bf16["weight_bytes"] * 2 == f32["weight_bytes"]
  assert results["skipped"] == {} and results["speedup"] is None
  assert len(logs) == 4

  text = benchmark.report(results)
  assert text.count("| jinfer |") == 4
  assert "not measured in this run" in text
  (tmp_path / "r.json").write_text(json.dumps(results))  # JSON-able


def test_peers_without_checkpoint_are_skipped_and_unknown_rejected():
  rows, skipped = benchmark.run_peers(["transformers"], None, TINY, log=lambda _: None)
  assert rows == [] and "transformers" in skipped
  with pytest.raises(ValueError, match="unknown peer"):
    benchmark.run_peers(["vllm"], None, TINY, log=lambda _: None)


def test_bad_config_is_rejected(tiny_model):
  with pytest.raises(ValueError, match="new_tokens"):
    benchmark.run_benchmark(tiny_model, dataclasses.replace(TINY, new_tokens=1), peers=[])
  with pytest.raises(ValueError, match="dtypes"):
    benchmark.run_benchmark(tiny_model, dataclasses.replace(TINY, dtypes=("float16",)), peers=[])
  with pytest.raises(ValueError, match="quantize formats"):
    benchmark.run_benchmark(tiny_model, dataclasses.replace(TINY, quantize=("int2",)), peers=[])


@pytest.mark.slow
def test_quantized_formats_rows_and_perplexity(tiny_model):
  cfg = dataclasses.replace(TINY, batch_sizes=(1,), dtypes=("float32",),
                            quantize=benchmark.QUANT_FORMATS)
  results = benchmark.run_benchmark(tiny_model, cfg, peers=["none"], log=lambda _: None)
  rows = {r["dtype"]: r for r in results["rows"]}
  assert list(rows) == ["float32", "int8", "w8a8", "int4", "int8-emb8", "int4-emb8", "int8kv"]
  for name, row in rows.items():
    _check_row(row, "jinfer", 1, name)
  # Projections dominate the tiny model's bytes; int8kv keeps float32 weights; the -emb8
  # formats also store the embedding table in int8.
  assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["float32"][
      "weight_bytes"] == rows["int8kv"]["weight_bytes"]
  for mode in ("int8", "int4"):
    assert rows[f"{mode}-emb8"]["weight_bytes"] < rows[mode]["weight_bytes"]
  results["perplexity"] = benchmark.bench_perplexity(
      tiny_model, ["float32", "int8", "int4", "int8kv"], log=lambda _: None,
      text="the quick brown fox jumps over the lazy dog " * 4)
  table = benchmark.report(results)
  assert "| int4 |" in table and "perplexity on" in table
  for row in results["perplexity"]:
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
  assert results["perplexity"][0]["vs_first"] == 0


@pytest.mark.slow
def test_transformers_point_on_tiny_random_llama():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256,
                                    eos_token_id=255, bos_token_id=1)
  torch_model = transformers.LlamaForCausalLM(config).eval()
  # Decode time is an N-token run minus a 1-token run: 32 tokens keep it well above the noise
  # of a shared machine (with 4, the difference measured <= 0 under load).
  cfg = dataclasses.replace(TINY, new_tokens=32, repeats=2)
  row = benchmark.bench_transformers_point(torch_model, list(range(8)), 2, cfg)
  _check_row(dataclasses.asdict(row), "transformers", 2, "float32")


def test_measured_read_bandwidth_is_a_plausible_rate():
  gbps = benchmark.measured_read_gbps(nbytes=16 << 20, seconds=0.05, repeats=2)
  assert 0.1 < gbps < 10_000  # GB/s: any real memory system, and not a unit mistake


def test_requested_bandwidth_overrides_the_measurement():
  assert benchmark.roofline_bandwidth(42.0) == (42.0, "--bandwidth_gbps")


def test_speedup_and_table_from_rows():
  cfg = benchmark.BenchConfig(new_tokens=11, bandwidth_gbps=30.0)
  ours = benchmark.make_row("jinfer", "float32", 1, cfg, compile_s=1.0, prefill_s=0.01,
                            decode_s=0.5, nbytes=10**9)
  theirs = benchmark.make_row("transformers", "float32", 1, cfg, compile_s=None, prefill_s=0.02,
                              decode_s=1.0, nbytes=10**9)
  assert ours.decode_tok_s == pytest.approx(20.0)
  assert ours.ms_per_step == pytest.approx(50.0)
  assert ours.ceiling_tok_s == pytest.approx(30.0)
  assert ours.bandwidth_fraction == pytest.approx(20 / 30)
  assert benchmark.speedup([ours, theirs]) == pytest.approx(2.0)
  assert "2.00x" in benchmark.speedup_line([ours, theirs])
  table = benchmark.format_table([ours, theirs], 30.0)
  assert "| transformers | float32 | 1 | - |" in table


@pytest.mark.slow
def test_beam_search_cost_rows(tiny_model):
  rows = benchmark.bench_beam_search(tiny_model, [1, 2, 3, 4], widths=[1, 2], new_tokens=4,
                                     repeats=1, log=lambda _: None)
  assert [r["width"] for r in rows] == [1, 2] and rows[0]["relative_cost"] == 1.0
  assert all(r["seconds"] > 0 and math.isfinite(r["beam_tok_s"]) for r in rows)
  assert "| 2 |" in benchmark.format_beam_table(rows)


@pytest.mark.slow
def test_speculative_rows_compare_with_plain_decoding(tiny_model):
  prompts = {"copy": [5, 6, 7, 5, 6, 7, 5, 6]}
  rows = benchmark.bench_speculative(tiny_model, prompts, ["ngram"], new_tokens=6, repeats=1,
                                     log=lambda _: None)
  assert [r["method"] for r in rows] == ["none", "ngram"]
  assert rows[0]["speedup"] == 1.0 and rows[0]["acceptance"] is None
  assert 0 <= rows[1]["acceptance"] <= 1 and rows[1]["tokens_per_forward"] >= 1
  assert "| copy | ngram |" in benchmark.format_speculative_table(rows)
