"""notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient), the loss falls and the task
metric rises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run it fresh, whatever outputs were saved with it
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = ""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.get('ename')}: {out.get('evalue')}"
            text += out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for c in nb.cells for o in c.get("outputs", []))  # the loss plot
    first, last, em0, em1 = map(float, re.search(
        r"loss ([\d.]+) -> ([\d.]+); exact match ([\d.]+) -> ([\d.]+)", text).groups())
    assert last < first / 3 and em1 > em0 + 0.5
    assert text.count(" ok") >= 3  # answers that were wrong before training are right after
