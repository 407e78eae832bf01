"""Writing results: metrics.json, frames.parquet and a Markdown table, each atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.writer import atomic_write_bytes, atomic_write_parquet


def write_metrics(out: Path, summary: dict[str, Any], frames: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(out / "frames.parquet", frames)
    atomic_write_bytes(out / "metrics.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """rows: setting (e.g. self / cross) -> its summary; one column per metric any setting reports, its
    unit in the header; FID / FVD cells carry their sample count N; PSNR's identical frames are counted
    below the table (their PSNR is infinite, so it is kept out of the means)."""
    names = list(dict.fromkeys(name for summary in rows.values() for name in summary["metrics"]))
    units = {name: unit for summary in rows.values() for name, unit in summary.get("units", {}).items()}
    header = [f"{name} [{units[name]}]" if name in units else name for name in names]
    lines = ["| setting | " + " | ".join(header) + " |", "|---" * (len(names) + 1) + "|"]
    notes = []
    for setting, summary in rows.items():
        sizes = {info.get("reported_as"): info.get("n") for info in summary.get("distribution", {}).values()}
        cells = []
        for name in names:
            value = summary["metrics"].get(name)
            cell = "–" if value is None or not math.isfinite(value) else f"{value:.4g}"
            cells.append(f"{cell} (N={sizes[name]})" if name in sizes and value is not None else cell)
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        if summary.get("psnr_identical_frames"):
            notes.append(
                f"{setting}: {summary['psnr_identical_frames']} frames identical to the ground truth "
                "(infinite PSNR), counted here and left out of psnr"
            )
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)
