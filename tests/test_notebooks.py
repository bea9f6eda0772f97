"""Every notebook in colab/ runs top to bottom on CPU (at a small size)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (REPO / "colab").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  monkeypatch.setenv("JAXLAB_NOTEBOOK_SMALL", "1")
  notebook = nbformat.read(REPO / "colab" / name, as_version=4)
  client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO / "colab")}})
  client.execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  if name == "attention.ipynb":  # the cells that print results did print them
    assert "GPU kernel (interpret)" in outputs and "exact match by digits" in outputs, outputs[-3000:]
  if name == "ssm.ipynb":
    assert "GPU kernel (interpret)" in outputs and "recall accuracy at" in outputs, outputs[-3000:]
    assert "influence at distance" in outputs, outputs[-3000:]
  if name == "moe.ipynb":
    assert "renormalized gates True : max |upcycled - dense| = " in outputs, outputs[-3000:]
    assert "tokens choosing their own domain's expert" in outputs and "expert-aware" in outputs, outputs[-3000:]
  if name == "merging.ipynb":
    assert "task arithmetic, scale 0: max |merged - base| = 0.0e+00" in outputs, outputs[-3000:]
    assert "mixture routed to source 1: max |mixture - source 1| = " in outputs, outputs[-3000:]
    assert "families:" in outputs and "Model-GLUE pipeline, mean accuracy" in outputs, outputs[-3000:]
  if name == "growth.ipynb":
    assert "identity, 2 -> 4 layers" in outputs and "ligo             loss at step 1" in outputs, outputs[-3000:]
