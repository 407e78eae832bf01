"""notebooks/shard_stats.ipynb runs top to bottom on a small real build (headless, nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from lookalike import REPO
from nbclient import NotebookClient
from test_select import cli, small_gaze_build

NOTEBOOK = Path(REPO) / "notebooks" / "shard_stats.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code[0].source.startswith("OUT = ")
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_notebook_runs_on_a_small_build(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    out = small_gaze_build(tmp_path_factory, tmp_path / "out")
    assert cli("select", "--out", str(out), "--min-frames", "8").returncode == 0
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells[1].source = f"OUT = {str(out)!r}"
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
