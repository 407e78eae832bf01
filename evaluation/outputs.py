"""Writing results: metrics.json, frames.parquet and a Markdown table, each atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.writer import atomic_write_bytes, atomic_write_parquet


def write_metrics(out: Path, summary: dict[str, Any], frames: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(out / "frames.parquet", frames)
    atomic_write_bytes(out / "metrics.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """rows: setting (e.g. self / cross) -> its summary; one column per metric any setting reports, its
    unit and direction (↑ higher is better, ↓ lower) in the header (`psnr [dB] ↑`); FID / FVD cells carry their sample
    count N; PSNR's identical frames are counted below the table (their PSNR is infinite, so it is kept
    out of the means), and so is each clip that could not be scored, with the reason."""
    from evaluation.scoring import direction

    names = list(dict.fromkeys(name for summary in rows.values() for name in summary["metrics"]))
    units = {name: unit for summary in rows.values() for name, unit in summary.get("units", {}).items()}
    header = [
        " ".join(filter(None, [name, f"[{units[name]}]" if name in units else "", direction(name)]))
        for name in names
    ]
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
        for clip, reason in summary.get("errors", {}).items():
            notes.append(f"{setting}: {clip} not scored: {reason}")
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def results_markdown(title: str, description: str, table: str) -> str:
    return f"# {title}\n\n{description}\n\n{table}"


def label_panels(panels: list[np.ndarray], labels: tuple[str, ...] | list[str]) -> list[np.ndarray]:
    """Each panel [T,H,W,3] with its label written in its top-left corner (white on a dark outline)."""
    labelled = []
    for panel, label in zip(panels, labels, strict=True):
        height = panel.shape[1]
        scale = max(height / 400, 0.25)
        thickness = max(1, round(scale * 2))
        origin = (max(2, height // 64), max(8, round(22 * scale) + 2))
        out = np.ascontiguousarray(panel).copy()
        for frame in out:
            cv2.putText(
                frame, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA
            )
            cv2.putText(
                frame, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
            )
        labelled.append(out)
    return labelled


def summarise_setting(evaluator: Any, scores: list, errors: dict[str, str]) -> dict[str, Any]:
    """A setting's summary (evaluator.summarise) with its per-clip errors; no scored clip gives no
    metric rather than a crash."""
    summary = evaluator.summarise(scores) if scores else {"metrics": {}, "clips": 0}
    return summary | {"errors": errors}


def write_results(
    out: Path,
    summary: dict[str, Any],
    scores: dict[str, list],
    pair_rows: list[dict[str, Any]],
    title: str,
    description: str,
) -> str:
    """pairs.parquet (cross pairs), frames.parquet (a `setting` column), metrics.json and results.md;
    returns the Markdown table. metrics.json comes after pairs.parquet: its presence says complete."""
    settings = {k: v for k, v in summary.items() if isinstance(v, dict) and "metrics" in v}
    table = markdown_table(settings)
    out.mkdir(parents=True, exist_ok=True)
    if pair_rows:
        atomic_write_parquet(out / "pairs.parquet", pd.DataFrame(pair_rows))
    tables = [pd.concat([s.frames for s in scores[k]]).assign(setting=k) for k in scores if scores[k]]
    write_metrics(out, summary, pd.concat(tables, ignore_index=True) if tables else pd.DataFrame())
    atomic_write_bytes(out / "results.md", results_markdown(title, description, table).encode())
    return table
