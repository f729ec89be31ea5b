"""The Colab notebooks in colab/: stored without outputs, and each runs top to bottom.

The run executes every cell in a fresh Jupyter kernel ("python3": the ipykernel of the Python
running pytest, whose kernelspec launches `sys.executable`) with the repository root as its
working directory, on whatever backend JAX finds (CPU here), with the real default model, so it
is slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL_STARTUP_TIMEOUT_S = 180  # importing jax in a busy machine's fresh kernel


def test_the_notebooks_exist():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "accelerators.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  """Outputs are stripped before committing: diffs stay readable and no stale results ship."""
  nb = json.loads(path.read_text(encoding="utf-8"))
  assert nb["nbformat"] == 4
  code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code_cells
  for i, cell in enumerate(code_cells):
    assert cell.get("outputs") == [], f"code cell {i} of {path.name} has outputs"
    assert cell.get("execution_count") is None, f"code cell {i} of {path.name} has a count"
  # The first code cell installs jinfer in Colab only.
  assert "google.colab" in "".join(code_cells[0]["source"])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = nbformat.read(str(path), as_version=4)  # in memory only: the file stays output-free
  # One more cell reports which Python the kernel ran: it must be this environment's.
  nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError (the cell and its traceback) if any cell fails
  for cell in nb.cells:
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.get("output_type") == "error"]
      assert not errors, errors
  kernel_prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
  assert kernel_prefix == sys.prefix, (
      f"the notebook ran in {kernel_prefix!r}, not in this environment ({sys.prefix!r}); a "
      f"'python3' kernelspec elsewhere on the Jupyter path points at another Python")
