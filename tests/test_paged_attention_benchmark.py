"""The paged-attention benchmark in quick mode on CPU, and its byte counting and page tables."""

import dataclasses

import numpy as np
import pytest

from jinfer.cache import NO_PAGE
from pallas_kernels.paged_attention import benchmark

QUICK = benchmark.Settings().quick()


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
    ("TPU v6 lite", 1640), ("cpu", 30), ("Some New Chip", None)])
def test_peak_bandwidth_is_looked_up_from_the_device_kind(kind, gbps):
  assert benchmark.peak_gbps_for(kind) == gbps


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


def test_quick_decode_prints_positive_bandwidth_figures(capsys):
  rows = benchmark.run_decode(QUICK)
  out = capsys.readouterr().out
  assert benchmark.CPU_NOTE in out and "peak bandwidth 30 GB/s" in out
  printed = _table_rows(out, "impl")
  assert [(r["impl"], int(r["context"])) for r in printed] == [
      ("xla", n) for n in QUICK.context_lens]
  for line, row in zip(printed, rows):
    time_us, mb, gbps = float(line["time (us)"]), float(line["K/V MB read"]), float(line["GB/s"])
    assert time_us > 0 and mb > 0 and gbps > 0 and float(line["of peak"].rstrip("%")) > 0
    assert gbps == pytest.approx(mb * 1e6 / (time_us * 1e-6) / 1e9, rel=0.05)
    assert row["kv_bytes"] == benchmark.kv_bytes([row["context_len"]] * QUICK.batch,
                                                 QUICK.page_size, QUICK.num_kv_heads,
                                                 QUICK.head_dim, QUICK.dtype)
    assert float(line["max err vs xla"]) == 0


def test_quick_prefill_prints_paged_and_contiguous_times(capsys):
  s = dataclasses.replace(QUICK, context_lens=(256,), chunk_sizes=(16,))
  benchmark.run_prefill(s)
  out = capsys.readouterr().out
  (attention,) = _table_rows(out, "batch")
  paged, dense = float(attention["paged (us)"]), float(attention["contiguous (us)"])
  assert paged > 0 and dense > 0
  assert float(attention["paged / contiguous"]) == pytest.approx(paged / dense, rel=0.02)
  assert float(attention["max diff"]) < 1e-2  # bfloat16 outputs of the same math
  model = _table_rows(out, "model")
  assert [(r["model"], int(r["chunk"])) for r in model] == [
      ("tiny-gqa", s.prompt_len), ("tiny-gqa", s.model_chunk)]
  for r in model:
    assert float(r["paged (ms)"]) > 0 and float(r["contiguous (ms)"]) > 0
    assert float(r["paged / contiguous"]) > 0


def test_bad_settings_name_the_flag():
  with pytest.raises(ValueError, match="num_q_heads"):
    benchmark.run_decode(dataclasses.replace(QUICK, num_q_heads=3))
  with pytest.raises(ValueError, match="chunk_sizes"):
    benchmark.run_prefill(dataclasses.replace(QUICK, chunk_sizes=(0,)))
