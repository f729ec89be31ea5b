"""The paged-attention benchmark: its error column (two implementations, or a wrong one caught),
byte counting and page tables; the quick-mode smoke runs on CPU are slow."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jinfer.cache import NO_PAGE
from pallas_kernels.paged_attention import benchmark

QUICK = benchmark.Settings().quick()
# Small enough for the kernels in interpret mode: 3 pages of 16 per row, one of them partial.
TINY = dataclasses.replace(QUICK, context_lens=(40,), num_kv_heads=2, num_q_heads=4, head_dim=64,
                           dtype="float32", repeats=1)


def _table_rows(text: str, first_header: str) -> list[dict[str, str]]:
  """The rows of the markdown table whose header starts with `first_header`, by column name."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
  cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
  header, rows = cells(lines[start]), []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append(dict(zip(header, cells(line))))
  return rows


@pytest.mark.parametrize("kind,gbps", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H200", 4800), ("TPU v4", 1200),
    ("TPU v5 lite", 819), ("TPU v5e", 819), ("TPU v5p", 2760), ("TPU v5", 2760),
    ("TPU v6 lite", 1640), ("cpu", None), ("Some New Chip", None)])
def test_peak_bandwidth_is_looked_up_from_the_device_kind(kind, gbps):
  assert benchmark.peak_gbps_for(kind) == gbps


def test_peak_is_unknown_on_cpu_unless_given():
  lines = []
  assert benchmark.describe_device(TINY, lines.append) == ("cpu", None)
  assert lines == ["device: cpu / cpu; peak bandwidth unknown (pass --peak_gbps)"]
  assert benchmark.describe_device(dataclasses.replace(TINY, peak_gbps=12.5), lines.append) == (
      "cpu", 12.5)
  assert lines[-1] == "device: cpu / cpu; peak bandwidth 12 GB/s"


def test_interpreted_kernels_are_checked_against_xla_untimed(capsys):
  """On CPU with interpret=True both kernels run interpreted: their error column compares two
  implementations (the XLA row, the reference itself, has none), and they are not timed."""
  rows = benchmark.run_decode(dataclasses.replace(TINY, interpret=True))
  assert [r["impl"] for r in rows] == ["xla", "pallas-tpu (interpret)", "pallas-gpu (interpret)"]
  xla, *kernels = rows
  assert xla["max_error"] is None and xla["time_us"] > 0
  for r in kernels:
    assert r["time_us"] is None and r["gbps"] is None and r["peak_fraction"] is None
    assert 0 <= r["max_error"] < 1e-4  # float32: the same attention, summed in another order
  printed = _table_rows(capsys.readouterr().out, "impl")
  assert printed[0]["max err vs xla"] == "-"
  assert [(p["time (us)"], p["GB/s"]) for p in printed[1:]] == [("-", "-")] * 2
  assert [float(p["max err vs xla"]) for p in printed[1:]] == pytest.approx(
      [r["max_error"] for r in kernels], rel=0.05, abs=1e-12)


def test_error_column_catches_a_wrong_kernel():
  """The error is measured against the XLA reference, not the row's own output: a kernel that
  drops the last page (a classic off-by-one) shows a large error, the reference itself none."""
  xla = functools.partial(benchmark.paged_attention, backend="xla")

  def drops_last_page(q, k_pages, v_pages, tables, lengths):
    return xla(q, k_pages, v_pages, tables, lengths - 1 - (lengths - 1) % TINY.page_size)

  rows = benchmark.bench_decode(TINY, platform="cpu", peak_gbps=100.0, log=lambda _: None,
                                impls={"xla": jax.jit(xla), "wrong": jax.jit(drops_last_page)})
  (xla_row, wrong_row) = rows
  assert xla_row["max_error"] is None and wrong_row["max_error"] > 0.1
  assert wrong_row["peak_fraction"] == pytest.approx(wrong_row["gbps"] / 100.0)


def test_kv_bytes_count_whole_pages_up_to_each_length():
  # Rows of 1, 16 and 17 tokens hold 1, 1 and 2 pages of 16: 64 tokens of K and of V.
  assert benchmark.kv_bytes([1, 16, 17], 16, num_kv_heads=2, head_dim=4,
                            dtype="bfloat16") == 2 * 64 * 2 * 4 * 2
  assert benchmark.kv_bytes([0], 16, 2, 4, "float32") == 0


def test_random_page_tables_are_disjoint_scattered_and_padded():
  lengths = [40, 3, 64]
  tables = benchmark.random_page_tables(np.random.default_rng(0), lengths, 16, 20, 5)
  assert tables.dtype == np.int32 and tables.shape == (3, 5)
  held = [row[row != NO_PAGE] for row in tables]
  assert [len(row) for row in held] == [3, 1, 4]
  assert (tables[0, 3:] == NO_PAGE).all() and (tables[1, 1:] == NO_PAGE).all()
  pages = np.concatenate(held)
  assert len(set(pages.tolist())) == len(pages) and pages.min() >= 0 and pages.max() < 20
  assert np.any(np.diff(pages) != 1)  # not one contiguous run
  with pytest.raises(ValueError, match="pages needed"):
    benchmark.random_page_tables(np.random.default_rng(0), [400], 16, 20, 25)


@pytest.mark.slow
def test_quick_decode_prints_positive_bandwidth_figures(capsys):
  s = dataclasses.replace(QUICK, peak_gbps=20.0)  # CPUs have no known peak: give one
  rows = benchmark.run_decode(s)
  out = capsys.readouterr().out
  assert benchmark.CPU_NOTE in out and "peak bandwidth 20 GB/s" in out
  printed = _table_rows(out, "impl")
  assert [(r["impl"], int(r["context"])) for r in printed] == [
      ("xla", n) for n in QUICK.context_lens]
  for line, row in zip(printed, rows):
    time_us, mb, gbps = float(line["time (us)"]), float(line["K/V MB read"]), float(line["GB/s"])
    assert time_us > 0 and mb > 0 and gbps > 0
    assert gbps == pytest.approx(mb * 1e6 / (time_us * 1e-6) / 1e9, rel=0.05)
    assert float(line["of peak"].rstrip("%")) == pytest.approx(100 * gbps / 20.0, rel=0.05,
                                                               abs=0.05)
    assert row["kv_bytes"] == benchmark.kv_bytes([row["context_len"]] * QUICK.batch,
                                                 QUICK.page_size, QUICK.num_kv_heads,
                                                 QUICK.head_dim, QUICK.dtype)
    assert line["max err vs xla"] == "-"  # the XLA reference is the only implementation here


@pytest.mark.slow
def test_quick_prefill_prints_paged_and_contiguous_times(capsys):
  s = dataclasses.replace(QUICK, context_lens=(256,), chunk_sizes=(16,))
  benchmark.run_prefill(s)
  out = capsys.readouterr().out
  (attention,) = _table_rows(out, "batch")
  paged, dense = float(attention["paged (us)"]), float(attention["contiguous (us)"])
  assert paged > 0 and dense > 0
  assert float(attention["paged / contiguous"]) == pytest.approx(paged / dense, rel=0.02)
  assert float(attention["max diff"]) < 1e-2  # bfloat16 outputs of the same math
  assert attention["ragged kernel (us)"] == attention["kernel max diff"] == "-"  # CPU: no kernel
  model = _table_rows(out, "model")
  assert [(r["model"], int(r["chunk"])) for r in model] == [
      ("tiny-gqa", s.prompt_len), ("tiny-gqa", s.model_chunk)]
  for r in model:
    assert float(r["paged (ms)"]) > 0 and float(r["contiguous (ms)"]) > 0
    assert float(r["paged / contiguous"]) > 0


def test_interpreted_ragged_kernel_reports_its_error_untimed():
  s = dataclasses.replace(TINY, chunk_sizes=(8,), prefill_batch=2, interpret=True)
  (row,) = benchmark.bench_prefill_attention(s, log=lambda _: None)
  assert row["kernel_us"] is None and row["kernel_error"] < 1e-5  # float32, the same attention
  line = _table_rows(benchmark.format_prefill_table([row]), "batch")[0]
  assert line["ragged kernel (us)"] == "-" and float(line["kernel max diff"]) < 1e-5


def test_bad_settings_name_the_flag():
  with pytest.raises(ValueError, match="num_q_heads"):
    benchmark.run_decode(dataclasses.replace(QUICK, num_q_heads=3))
  with pytest.raises(ValueError, match="chunk_sizes"):
    benchmark.run_prefill(dataclasses.replace(QUICK, chunk_sizes=(0,)))
