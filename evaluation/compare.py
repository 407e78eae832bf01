"""`python -m evaluation compare`: the metrics of any method's output video against a ground truth,
a reference image and a driving video."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evaluation.distribution import DEFAULT_PROTOCOL
from evaluation.frames import read_frames
from evaluation.outputs import write_metrics
from evaluation.scoring import Evaluator


def compare_videos(
    pred: Path,
    target: Path | None,
    out: Path,
    reference: Path | None = None,
    driving: Path | None = None,
    backend: str = "insightface",
    weights_dir: str | Path | None = None,
    device: str = "auto",
    protocol: str = DEFAULT_PROTOCOL,
) -> dict[str, Any]:
    """Score pred, write out/metrics.json and out/frames.parquet, return the summary. Without a target
    it is cross reenactment (no reconstruction metrics, no AKD)."""
    weights_dir = weights_dir or os.environ.get("WEIGHTS_DIR") or None
    evaluator = Evaluator(weights_dir, backend, device, protocol)
    scores = evaluator.score_clip(
        read_frames(pred),
        read_frames(target) if target else None,
        read_frames(reference)[:1] if reference else None,
        read_frames(driving) if driving else None,
        clip=Path(pred).stem,
    )
    summary = evaluator.summarise([scores])
    summary["inputs"] = {
        "pred": str(pred),
        "target": str(target) if target else None,
        "reference": str(reference) if reference else None,
        "driving": str(driving) if driving else None,
    }
    write_metrics(out, summary, scores.frames)
    return summary
