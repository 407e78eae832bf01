"""Gaze stage throughput: L2CS-Net crops/s batched (frame_batch = N) against one crop at a time, JSON out.

    python benchmarks/stage_gaze.py                          # tiny weights, CPU, 8 frames, 448² crops
    python benchmarks/stage_gaze.py --device cuda --frames 256 --frame-batch 64

The stage runs with every=1 so every frame is a crop: `frames_per_s` counts model crops. A clip at the
default every=10 is annotated 10x faster per clip frame (`clip_frames_per_s_at_every_10`). Weights are
the tiny profile's random L2CS ResNet50 in the released layout: same shapes, so the same cost as real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sources.demo import make_identity, render_clip  # noqa: E402
from pipeline.stages.gaze import GazeStage  # noqa: E402
from pipeline.weights import ensure_tiny_weights  # noqa: E402


def demo_frames(count: int, resolution: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A talking head from the demo generator: frames [T,R,R,3] and face boxes [T,4] in pixels."""
    frames, boxes, _ = render_clip(
        make_identity(0), count, (resolution, resolution), resolution * 0.47, 0.5, 0
    )
    return frames, boxes


def _time_stage(stage: GazeStage, row: dict, repeats: int) -> float:
    stage.process(
        dict(row, frames=row["frames"][:1], face_boxes=json.dumps(json.loads(row["face_boxes"])[:1]))
    )
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        stage.process(dict(row))
        if stage.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench(
    weights_dir: str | Path,
    frames: np.ndarray | int = 8,
    frame_batch: int = 8,
    input_size: int = 448,
    device: str = "auto",
    repeats: int = 1,
) -> dict:
    """Crops/s of the gaze stage with `frame_batch` crops per forward against one per forward, same run."""
    if isinstance(frames, int):
        frames, boxes = demo_frames(frames)
    else:
        size = frames.shape[1]
        boxes = np.tile([size * 0.25, size * 0.2, size * 0.75, size * 0.8], (len(frames), 1))
    row = {"frames": frames, "face_boxes": json.dumps(np.asarray(boxes).tolist())}
    options = {"every": 1, "max_samples": len(frames), "input_size": input_size, "device": device}
    batched = GazeStage(str(weights_dir), frame_batch=frame_batch, **options)
    seconds_batched = _time_stage(batched, row, repeats)
    batched.frame_batch = 1  # same model, one crop per forward
    seconds_single = _time_stage(batched, row, repeats)
    n = len(frames)
    return {
        "stage": "gaze",
        "device": str(batched.device),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if batched.device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(batched.dtype),
        "input_size": input_size,
        "frames": n,
        "frame_batch": frame_batch,
        "frames_per_s_batched": n / seconds_batched,
        "frames_per_s_single": n / seconds_single,
        "speedup": seconds_single / seconds_batched,
        "seconds_per_crop_batched": seconds_batched / n,
        "clip_frames_per_s_at_every_10": 10 * n / seconds_batched,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights-dir", default=None, help="folder holding l2cs/L2CSNet_gaze360.pkl (tiny if absent)"
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights_dir = (
            Path(args.weights_dir) if args.weights_dir else ensure_tiny_weights(Path(tmp), ["l2cs_gaze360"])
        )
        result = bench(weights_dir, args.frames, args.frame_batch, args.input_size, args.device, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
