"""The prefill benchmark: its table, its plot, and a run on the tiny model."""

from matplotlib import image

from jinfer import benchmark
import jinfer.prefill_benchmark as prefill_benchmark

RESULTS = {"rows": [
    {"tokens": 512, "jinfer_seconds": 0.5, "jinfer_peak_rss_mb": 1900.0,
     "transformers_seconds": 1.0},
    {"tokens": 2048, "jinfer_seconds": 4.0, "jinfer_peak_rss_mb": 2300.0,
     "transformers_seconds": 6.0}], "skipped": {}, "repeats": 2}


def test_table_shows_speed_ratio_and_growth_against_the_triangle():
  table = prefill_benchmark.format_prefill(RESULTS)
  # 512 tokens: 1024 tok/s, 2.00x transformers; 2048: 512 tok/s, 1.50x, and 8x the time for 4x
  # the tokens is 0.50 of quadratic growth.
  assert "| 512 | 0.50 | 1024 | 1.00 | 2.00x | 1.00 | 1900 |" in table
  assert "| 2048 | 4.00 | 512 | 6.00 | 1.50x | 0.50 | 2300 |" in table


def test_plot_is_a_png(tmp_path):
  path = prefill_benchmark.plot_prefill(RESULTS, str(tmp_path / "prefill.png"))
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  assert image.imread(path).shape == (480, 720, 4)  # 6 x 4 inches at 120 dpi, RGBA


def test_runs_on_the_tiny_model(tiny_model, capsys):
  with benchmark.progress_bar(2, "prefill", enabled=False) as bar:
    results = prefill_benchmark.run_prefill(tiny_model, [8, 40], peers=["none"], ctx=None,
                                            repeats=1, log=lambda _: None, progress=bar)
  assert capsys.readouterr().err == ""  # the bar is off: tqdm wrote nothing
  rows = results["rows"]
  assert [r["tokens"] for r in rows] == [8, 40]
  assert all(r["jinfer_seconds"] > 0 and r["jinfer_peak_rss_mb"] > 0 for r in rows)
  assert "transformers_seconds" not in rows[0] and results["skipped"] == {}
  assert "| 40 |" in prefill_benchmark.format_prefill(results)
