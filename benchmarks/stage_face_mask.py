"""Frames/s of the face-mask stage (facexlib parsing), batched against one frame at a time, JSON out.

    python benchmarks/stage_face_mask.py                                  # tiny, CPU, ~30 s
    python benchmarks/stage_face_mask.py --models parsenet bisenet --input-size 512 \\
        --resolution 512 --frames 64 --frame-batch 32 --device cuda         # GPU node

The tiny profile writes facexlib's full-size ParseNet / BiSeNet with random weights, so the compute
measured is that of the real networks; only the predicted labels differ. The foreground stage's
parsing backend runs the same `FaceParser` and costs the same per frame.
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
from pipeline.stages.face_mask import FaceMaskStage  # noqa: E402
from pipeline.video import crop_and_resize  # noqa: E402
from pipeline.weights import ensure_tiny_weights  # noqa: E402


def demo_frames(num: int, resolution: int) -> np.ndarray:
    """A talking head from the demo generator, cropped to a square and resized: uint8 [T,R,R,3]."""
    frames, boxes, _ = render_clip(make_identity(0), num, (320, 320), 150.0, 1.0, seed=0)
    return crop_and_resize(frames, (0, 0, 320, 320), resolution)


def _frames_per_second(stage: FaceMaskStage, frames: np.ndarray, repeats: int) -> float:
    row = {"frames": frames, "bucket": "real", "face_boxes": ""}
    stage.process(dict(row, frames=frames[: stage.parser.frame_batch]))  # warm-up (kernels, allocator)
    if stage.parser.device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        stage.process(dict(row))
        if stage.parser.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(frames) / best


def bench(
    weights_dir: str | Path,
    frames: np.ndarray | int = 16,
    model: str = "bisenet",
    input_size: int = 128,
    frame_batch: int = 8,
    resolution: int = 256,
    device: str = "auto",
    repeats: int = 1,
) -> dict:
    """Frames/s with `frame_batch` frames per forward pass and with one, in the same run."""
    if isinstance(frames, int):
        frames = demo_frames(frames, resolution)
    options = {"model": model, "input_size": input_size, "device": device}
    batched = FaceMaskStage(str(weights_dir), frame_batch=frame_batch, **options)
    single = FaceMaskStage(str(weights_dir), frame_batch=1, **options)
    fps_batched = _frames_per_second(batched, frames, repeats)
    fps_single = _frames_per_second(single, frames, repeats)
    return {
        "stage": "face_mask",
        "model": model,
        "input_size": input_size,
        "resolution": int(frames.shape[1]),
        "frames": int(len(frames)),
        "frame_batch": frame_batch,
        "device": str(batched.parser.device),
        "frames_per_s_batched": round(fps_batched, 2),
        "frames_per_s_single": round(fps_single, 2),
        "ms_per_frame_batched": round(1000 / fps_batched, 1),
        "speedup": round(fps_batched / fps_single, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights-dir", default=None, help="tiny weights folder (default: a temp folder)")
    parser.add_argument("--models", nargs="+", default=["bisenet", "parsenet"])
    parser.add_argument("--input-size", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--frame-batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights_dir = Path(args.weights_dir or tmp)
        ensure_tiny_weights(weights_dir, args.models)
        frames = demo_frames(args.frames, args.resolution)
        results = [
            bench(
                weights_dir, frames, model, size, args.frame_batch, args.resolution, args.device, args.repeats
            )
            for model in args.models
            for size in args.input_size
        ]
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }
    print(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
