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
    """rows: setting (e.g. self / cross) -> its summary; one column per metric."""
    names = list(next(iter(rows.values()))["metrics"])
    lines = ["| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for setting, summary in rows.items():
        cells = []
        for name in names:
            value = summary["metrics"][name]
            cells.append("–" if value is None or not math.isfinite(value) else f"{value:.4g}")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
