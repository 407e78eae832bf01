"""`python -m evaluation compare`: the metrics of any method's output video against a ground truth,
a reference image and a driving video; with a protocol file, of a folder of another method's videos
(one mp4 per clip, named by its key) on exactly the protocol's clips, frames and pairs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.distribution import DEFAULT_PROTOCOL
from evaluation.frames import fit_frames, read_frames, warn_aspect
from evaluation.outputs import (
    markdown_table,
    results_markdown,
    summarise_setting,
    write_metrics,
    write_results,
)
from evaluation.protocol import Benchmark, ground_truth, shard_samples, task_name, tasks_of
from evaluation.scoring import PER_PAIR, Evaluator
from pipeline.writer import atomic_write_bytes

log = logging.getLogger(__name__)

CROSS_FOLDER = "cross"  # cross-reenactment videos: DIR/cross/<driving clip key>.mp4


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
    """Score pred, write out/metrics.json, out/frames.parquet and out/results.md, return the summary.
    Without a target it is cross reenactment (no reconstruction metrics, no AKD)."""
    weights_dir = weights_dir or os.environ.get("WEIGHTS_DIR") or None
    evaluator = Evaluator(weights_dir, backend, device, protocol)
    frames = read_frames(pred)
    height, width = frames.shape[1:3]
    scores = evaluator.score_clip(
        frames,
        warn_aspect(read_frames(target), height, width, str(target)) if target else None,
        warn_aspect(read_frames(reference)[:1], height, width, str(reference)) if reference else None,
        warn_aspect(read_frames(driving), height, width, str(driving)) if driving else None,
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
    table = markdown_table({"self" if target else "cross": summary})
    atomic_write_bytes(out / "results.md", results_markdown(f"Evaluation of {pred}", "", table).encode())
    return summary


def prediction_path(pred_dir: Path, setting: str, driving: str) -> Path:
    """Where a method's video for a clip lies: DIR/<key>.mp4 (self), DIR/cross/<driving key>.mp4."""
    return pred_dir / CROSS_FOLDER / f"{driving}.mp4" if setting == "cross" else pred_dir / f"{driving}.mp4"


def read_prediction(path: Path, num_frames: int, resolution: int) -> np.ndarray:
    """The method's first num_frames frames at the protocol's resolution; a missing or too-short
    video is an error naming what the protocol needs."""
    if not path.is_file():
        raise FileNotFoundError(f"no prediction {path}: the protocol needs this video ({num_frames} frames)")
    frames = read_frames(path)
    if len(frames) < num_frames:
        raise ValueError(f"{path.name}: {len(frames)} frames, the protocol scores {num_frames}")
    return fit_frames(frames[:num_frames], resolution, resolution, str(path))


def compare_protocol(
    benchmark: Benchmark,
    pred_dir: Path,
    out: Path,
    backend: str = "insightface",
    weights_dir: str | Path | None = None,
    device: str = "auto",
    shards: str | None = None,
    protocol_path: str | None = None,
) -> dict[str, Any]:
    """Score a folder of another method's videos on the protocol's clips (self reenactment: DIR/<key>.mp4
    against the clip's frames) and cross pairs (DIR/cross/<driving key>.mp4, driven by that clip, with
    the reference of the pair's other clip); each missing or unreadable video is a per-clip error."""
    weights_dir = weights_dir or os.environ.get("WEIGHTS_DIR") or None
    evaluator = Evaluator(weights_dir, backend, device, benchmark.metrics["distribution"]["name"])
    samples = shard_samples(benchmark, shards)
    clips = {clip["key"]: clip for clip in benchmark.clips}
    tasks = tasks_of(benchmark)
    scores: dict[str, list] = {setting: [] for setting, _, _ in tasks}
    errors: dict[str, dict[str, str]] = {setting: {} for setting in scores}
    pair_rows = []
    for number, (setting, ref, drv) in enumerate(tasks, 1):
        name = task_name(setting, ref, drv)
        try:
            missing = [k for k in dict.fromkeys([ref, drv]) if k not in samples]
            if missing:
                raise KeyError(f"{missing} not in the {benchmark.split!r} shards")
            truth = ground_truth(samples[drv], clips[drv], benchmark.resolution)
            reference = (
                truth["reference"]
                if ref == drv
                else ground_truth(samples[ref], clips[ref], benchmark.resolution)["reference"]
            )
            pred = read_prediction(
                prediction_path(pred_dir, setting, drv), benchmark.num_frames, benchmark.resolution
            )
        except (ValueError, KeyError, OSError) as exc:
            errors[setting][name] = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            log.warning("clip %d/%d %s: error: %s", number, len(tasks), name, errors[setting][name])
            continue
        target = truth["target"] if setting == "self" else None
        score = evaluator.score_clip(pred, target, reference, truth["target"], clip=name)
        scores[setting].append(score)
        if setting == "cross":
            pair_rows.append({
                "reference_clip": ref, "reference_identity": clips[ref]["identity"],
                "driving_clip": drv, "driving_identity": clips[drv]["identity"],
                **{k: score.pair.get(k, float("nan")) for k in PER_PAIR},
            })  # fmt: skip
        log.info("clip %d/%d %s: done", number, len(tasks), name)
    summary: dict[str, Any] = {
        setting: summarise_setting(evaluator, scores[setting], errors[setting]) for setting in scores
    }
    summary |= {
        "pred_dir": str(pred_dir),
        "shards": str(shards or benchmark.shards),
        "split": benchmark.split,
        "clips": benchmark.keys,
        "protocol_file": {"path": protocol_path, "hash": benchmark.hash},
    }
    description = (
        f"{pred_dir} on the protocol {protocol_path or ''} ({benchmark.hash}): {len(benchmark.clips)} clips of "
        f"{benchmark.shards} ({benchmark.split}), {benchmark.num_frames} frames at stride {benchmark.stride} "
        f"and {benchmark.resolution}², {len(benchmark.cross_pairs)} cross pairs, backend {backend}."
    )
    write_results(out, summary, scores, pair_rows, f"Evaluation of {pred_dir}", description)
    return summary
