"""The benchmark's regression check: which ratios a run yields, how they compare with a
baseline, and the baseline file's checks. Synthetic rows: no model runs here."""

import json
import pathlib

import pytest

from jinfer import benchmark_check
from jinfer.errors import InvalidRequestError


def _row(system, dtype, batch, tok_s, fraction=None):
  return {"system": system, "dtype": dtype, "batch": batch, "decode_tok_s": tok_s,
          "bandwidth_fraction": fraction}


ROWS = [_row("jinfer", "float32", 1, 80.0, 0.9), _row("jinfer", "float32", 8, 240.0),
        _row("jinfer", "int8", 1, 200.0, 0.8), _row("jinfer", "int8", 8, 500.0),
        _row("jinfer", "int4", 1, 250.0, 0.6), _row("jinfer", "int4", 8, 400.0),
        _row("jinfer 1x2", "float32", 1, 60.0),  # a mesh row: not a format of its own
        _row("transformers", "float32", 1, 40.0), _row("llama_cpp", "gguf-native", 1, 100.0)]


def test_a_run_yields_ceiling_fractions_batch_scaling_and_peer_ratios():
  ratios = benchmark_check.run_ratios(ROWS)
  assert ratios == pytest.approx({
      "jinfer float32 batch 1: of bandwidth ceiling": 0.9,
      "jinfer int8 batch 1: of bandwidth ceiling": 0.8,
      "jinfer int4 batch 1: of bandwidth ceiling": 0.6,
      "jinfer float32: batch 8 / batch 1": 3.0,
      "jinfer int8: batch 8 / batch 1": 2.5,
      "jinfer int4: batch 8 / batch 1": 1.6,
      "jinfer int4 / int8 at batch 1": 1.25,
      "jinfer int4 / int8 at batch 8": 0.8,
      "jinfer float32 / transformers float32 at batch 1": 2.0,
      "jinfer float32 / llama_cpp at batch 1": 0.8,
      "jinfer int8 / llama_cpp at batch 1": 2.0,
      "jinfer int4 / llama_cpp at batch 1": 2.5,
  })


def test_more_than_ten_percent_below_the_baseline_is_a_regression():
  baseline = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 1.0}
  measured = {"a": 0.91, "b": 1.79, "c": 4.0}  # a: 9% below (ok), b: 10.5% below, d: absent
  rows = benchmark_check.compare(measured, baseline)
  assert [r["status"] for r in rows] == ["ok", "regressed", "ok", "not measured"]
  assert benchmark_check.regressions(rows) == ["b"]
  table = benchmark_check.format_check(rows)
  assert "| b | 2.000 | 1.790 | -10.5% | regressed |" in table
  assert "| d | 1.000 | - | - | not measured |" in table


def test_a_recorded_baseline_loads_back(tmp_path):
  path = tmp_path / "baseline.json"
  ratios = benchmark_check.run_ratios(ROWS)
  benchmark_check.record(path, ratios, {"cpu_model": "test"}, "jinfer benchmark --x")
  assert benchmark_check.load_baseline(path) == pytest.approx(ratios)
  assert json.loads(path.read_text())["command"] == "jinfer benchmark --x"


@pytest.mark.parametrize("content,words", [
    (None, "does not exist"), ("{not json", "not readable JSON"),
    ('{"ratios": {"a": -1}}', "positive numbers"), ('{"ratios": {"a": true}}', "positive"),
    ('{"ratios": {}}', "non-empty"),
    ("[1, 2]", "no non-empty 'ratios' object")])
def test_bad_baselines_are_refused_with_the_fix(tmp_path, content, words):
  path = tmp_path / "baseline.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(InvalidRequestError, match=words):
    benchmark_check.load_baseline(path)


def test_recording_again_keeps_each_ratios_lowest_value(tmp_path):
  path = tmp_path / "baseline.json"
  assert benchmark_check.record(path, {"a": 1.0, "b": 2.0}, {}, "cmd") == 1
  assert benchmark_check.record(path, {"a": 0.8, "b": 2.5, "c": 3.0}, {}, "cmd") == 2
  assert benchmark_check.load_baseline(path) == {"a": 0.8, "b": 2.0, "c": 3.0}
  assert benchmark_check.record(path, {"a": 5.0}, {}, "another command") == 1  # starts over
  assert benchmark_check.load_baseline(path) == {"a": 5.0}


def test_an_empty_run_records_nothing(tmp_path):
  with pytest.raises(InvalidRequestError, match="nothing written"):
    benchmark_check.record(tmp_path / "b.json", {}, {}, "jinfer benchmark")
  assert not (tmp_path / "b.json").exists()


def test_the_recorded_baseline_in_the_repository_is_valid():
  root = pathlib.Path(__file__).resolve().parent.parent
  ratios = benchmark_check.load_baseline(root / "experiments" / "baselines" / "cpu_decode.json")
  assert "jinfer int4-emb8 batch 1: of bandwidth ceiling" in ratios
