"""The benchmark plots on synthetic results (no model), the roofline math they draw, and the
progress bar's silence when it is off."""

import dataclasses
import io
import math

import pytest
from matplotlib import image

from jinfer import benchmark, plots


def _row(system: str, dtype: str, batch: int, tok_s: float, nbytes) -> dict:
  return dataclasses.asdict(benchmark.Row(
      system=system, dtype=dtype, batch=batch, prompt_tokens=64, new_tokens=128, compile_s=None,
      prefill_ms=10.0, decode_tok_s=tok_s, ms_per_step=1e3 * batch / tok_s, weight_bytes=nbytes))


# 10 GB/s over 1 GB of float32 weights: 10 tok/s per row of the batch; 1e11 FLOP/s over
# 2 x 2.5e8 parameters: 200 tok/s at any batch.
COMPUTE = {"param_count": 250_000_000, "peak_flops": 1e11, "compute_tok_s": 200.0,
           "source": "measured matmul FLOP/s (synthetic)"}
DECODE = {
    "facts": {"backend": "cpu", "cpu_model": "Test CPU", "cpu_count": 2},
    "config": {"bandwidth_gbps": 10.0, "prompt_tokens": 64, "new_tokens": 128, "repeats": 2},
    "rows": ([_row("jinfer", "float32", b, 8.0 * b, 10**9) for b in (1, 2, 4, 8, 32)]
             + [_row("jinfer", "bfloat16", b, 15.0 * b, 5 * 10**8) for b in (1, 2, 4, 8, 32)]
             + [_row("transformers", "float32", b, 4.0 * b, 10**9) for b in (1, 2, 4, 8, 32)]
             + [_row("llama_cpp", "gguf-native", 1, 25.0, 3 * 10**8)]),
    "compute_roofline": COMPUTE,
}


def _check_png(path: str, height: int, width: int):
  pixels = image.imread(path)
  assert pixels.shape == (height, width, 4)  # RGBA
  assert pixels[..., :3].std() > 0  # something drawn, not a blank canvas


def test_roofline_matches_a_hand_computation():
  assert benchmark.bandwidth_ceiling(10**9, 10.0) == pytest.approx(10.0)
  assert benchmark.compute_ceiling(250_000_000, 1e11) == pytest.approx(200.0)
  for batch, expected in ((1, 10.0), (8, 80.0), (16, 160.0), (32, 200.0), (64, 200.0)):
    assert benchmark.roofline_tok_s(batch, 10**9, 10.0, 200.0) == pytest.approx(expected)
  assert benchmark.roofline_tok_s(64, 10**9, 10.0) == pytest.approx(640.0)  # bandwidth only
  # At batch 1 the plotted roofline is the table's ceiling column.
  cfg = benchmark.BenchConfig(new_tokens=11, bandwidth_gbps=10.0)
  row = benchmark.make_row("jinfer", "float32", 1, cfg, compile_s=0.0, prefill_s=0.01,
                           decode_s=2.0, nbytes=10**9)
  assert row.ceiling_tok_s == pytest.approx(benchmark.roofline_tok_s(1, 10**9, 10.0, 200.0))


def test_decode_rows_group_by_system_and_format():
  groups = plots.decode_groups(list(reversed(DECODE["rows"])))
  assert list(groups) == [("llama_cpp", "gguf-native"), ("transformers", "float32"),
                          ("jinfer", "bfloat16"), ("jinfer", "float32")]
  assert [r["batch"] for r in groups[("jinfer", "float32")]] == [1, 2, 4, 8, 32]


def test_decode_plot_is_a_png_of_the_expected_size(tmp_path):
  path = plots.plot_decode(DECODE, str(tmp_path / "decode.png"), "tiny-model")
  _check_png(path, 500, 800)
  # Without a compute ceiling (e.g. an older --json_out file) only the bandwidth bound is drawn.
  older = {k: v for k, v in DECODE.items() if k != "compute_roofline"}
  _check_png(plots.plot_decode(older, str(tmp_path / "older.png")), 500, 800)


def test_decode_plot_titles_the_machine():
  assert plots.machine_name(DECODE["facts"]) == "Test CPU (2 CPUs)"
  assert plots.machine_name({"backend": "gpu", "device_kind": "NVIDIA H200",
                             "device_count": 1}) == "1 x NVIDIA H200"


SERVING = {
    "config": {"num_requests": 4, "request_rate": math.inf, "max_num_seqs": 4},
    "rows": [{"system": "jinfer engine", "seconds": 1.0, "tokens": 40, "tok_s": 40.0,
              "request_ttft_s": [0.05, 0.1, 0.2, 0.4], "request_tpot_s": [0.01, 0.012, 0.02]},
             {"system": "jinfer.generate, static batches of 2", "seconds": 2.0, "tokens": 40,
              "tok_s": 20.0}],
    "skipped": {},
}


def test_serving_plot_is_a_png_of_the_expected_size(tmp_path):
  _check_png(plots.plot_serving(SERVING, str(tmp_path / "serving.png"), "tiny"), 450, 1100)
  poisson = dict(SERVING, config=dict(SERVING["config"], request_rate=4.0))
  _check_png(plots.plot_serving(poisson, str(tmp_path / "poisson.png")), 450, 1100)


def test_progress_off_writes_nothing_to_stderr(capsys):
  for enabled in (False, True):  # True: stderr is captured here, not a terminal
    with benchmark.progress_bar(3, "points", enabled=enabled) as bar:
      benchmark.advance(bar, 3)
  assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_draws_a_bar(monkeypatch):
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal = Terminal()
  monkeypatch.setattr("sys.stderr", terminal)
  with benchmark.progress_bar(4, "points") as bar:
    benchmark.advance(bar, 4)
  assert "/4" in terminal.getvalue()


def test_a_skipped_peer_still_fills_the_bar():
  class Counter:
    n = 0

    def update(self, k=1):
      self.n += k

  counter = Counter()
  cfg = benchmark.BenchConfig(batch_sizes=(1, 2, 4))
  rows, skipped = benchmark.run_peers(["transformers", "llama_cpp", "none"], None, cfg,
                                      log=lambda _: None, progress=counter)
  assert rows == [] and set(skipped) == {"transformers", "llama_cpp"}
  assert counter.n == 3 + 1 == benchmark.decode_points(
      dataclasses.replace(cfg, dtypes=(), quantize=()), ["transformers", "llama_cpp", "none"])
