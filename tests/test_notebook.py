"""notebooks/shard_stats.ipynb runs top to bottom on a small real build (headless, nbclient)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from lookalike import REPO
from test_select import cli, small_gaze_build

NOTEBOOK = Path(REPO) / "notebooks" / "shard_stats.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "\nOUT = " in code[0].source
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_make_report_runs_the_notebook_on_a_small_build(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """`make report OUT=...`: the notebook executed headless (a failing cell fails it) into HTML."""
    out = small_gaze_build(tmp_path_factory, tmp_path / "out")
    assert cli("select", "--out", str(out), "--min-frames", "8").returncode == 0
    command = ["make", "-o", "setup", "report", f"OUT={out}", f"BIN={Path(sys.executable).parent}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    html = (out / "shard_stats.html").read_text()
    assert html.count("data:image/png") >= 5  # buckets, splits, gaze, the 2x2 panel, samples
    for heading in ("Held-out splits", "Attributes and emotions", "train"):
        assert heading in html
    assert "Traceback" not in html


def test_report_refuses_a_folder_without_a_build(tmp_path: Path) -> None:
    assert cli("report", "--out", str(tmp_path)).returncode == 2
