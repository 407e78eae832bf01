"""The shard-statistics notebook, executed headless for one build and saved as HTML (`make report`)."""

from __future__ import annotations

import logging
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

from pipeline.writer import atomic_write_bytes

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "shard_stats.ipynb"
OUT_CELL = 1  # the code cell that sets OUT


def run_report(out: Path, html: Path | None = None, timeout: float = 600) -> Path:
    """Execute the notebook on the build in `out` and write it with its outputs as HTML (default:
    OUT/shard_stats.html). A cell that fails stops the report with the notebook's error."""
    out = out.resolve()
    if not (out / "index.parquet").is_file():
        raise FileNotFoundError(f"no {out / 'index.parquet'}: build the shards first")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = notebook.cells[OUT_CELL]
    if cell.cell_type != "code" or "OUT = " not in cell.source:
        raise ValueError(f"{NOTEBOOK}: cell {OUT_CELL} no longer sets OUT")
    cell.source = f"OUT = {str(out)!r}"
    log.info("executing %s on %s", NOTEBOOK.name, out)
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    body, _ = HTMLExporter().from_notebook_node(notebook)
    target = html or out / "shard_stats.html"
    atomic_write_bytes(target, body.encode())
    return target
