"""docs/tour.ipynb (scan -> hunt -> explain -> verify -> serve on the embedded model) runs from top to bottom
without an error, executed by nbclient in a fresh kernel, and leaves the run folders it describes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "tour.ipynb"


def test_tour_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("NH_TOUR_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    hunt = tmp_path / "runs" / "hunt"
    for name in ("neurons.parquet", "examples.parquet", "explanations.parquet", "claims.parquet", "manifest.json"):
        assert (hunt / name).exists(), name
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert "neuronhunter serve" in last and "monosemantic neurons" in last
