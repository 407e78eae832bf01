"""The shard-statistics notebook, executed headless for one build and saved as HTML (`make report`).

The build may be a local folder or a URI (s3://bucket/prefix): the notebook reads through
pipeline/storage.py, and its kernel inherits this process's environment (the AWS_* settings)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

from pipeline import storage

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "shard_stats.ipynb"
OUT_CELL = 1  # the code cell that sets OUT


def weights_note(out: str | os.PathLike) -> str:
    """Whether the build's annotations (masks, gaze, swaps, styles) come from real or random-weight models
    (build.json's profile), in words for the report."""
    import json

    path = storage.join(str(out), "build.json")
    try:
        build = json.loads(storage.read_bytes(path))
        profile, stages = build["config"]["profile"], [s["name"] for s in build["config"]["stages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return f"annotation models: unknown (no readable {path})"
    if not stages:
        return "annotation models: none (stages=[]): no masks, gaze, swaps or styles"
    if profile == "tiny":
        return (
            f"annotation models: RANDOM WEIGHTS (profile=tiny) for {', '.join(stages)}: the masks, gaze, swaps "
            "and styles show the plumbing only, not real annotations; real ones need profile=full "
            "(make weights, then make shards)"
        )
    return f"annotation models: real weights (profile={profile}) for {', '.join(stages)}"


def run_report(out: str | os.PathLike, html: str | os.PathLike | None = None, timeout: float = 600) -> str:
    """Execute the notebook on the build in `out` and write it with its outputs as HTML (default:
    OUT/shard_stats.html, on the same storage). A cell that fails stops the report with its error."""
    out = str(out) if storage.is_remote(out) else str(Path(out).resolve())
    index = storage.join(out, "index.parquet")
    if not storage.is_file(index):
        raise FileNotFoundError(f"no {index}: build the shards first")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = notebook.cells[OUT_CELL]
    if cell.cell_type != "code" or "OUT = " not in cell.source:
        raise ValueError(f"{NOTEBOOK}: cell {OUT_CELL} no longer sets OUT")
    cell.source = f"OUT = {out!r}"
    log.info("executing %s on %s; %s", NOTEBOOK.name, out, weights_note(out))
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    body, _ = HTMLExporter().from_notebook_node(notebook)
    target = str(html) if html is not None else storage.join(out, "shard_stats.html")
    storage.put_bytes(target, body.encode())  # atomic: a temp file renamed, or one PUT
    return target
