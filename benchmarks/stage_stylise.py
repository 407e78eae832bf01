"""Stylisation stage throughput: frames/s with `frame_batch` frames per SDXL call against one frame per
call, measured in the same run on the same loaded pipeline. JSON on stdout.

    python benchmarks/stage_stylise.py                         # tiny profile, CPU, the demo settings
    python benchmarks/stage_stylise.py --profile full --weights-dir $WEIGHTS_DIR --device cuda \\
        --resolution 512 --size 512 --steps 30 --frame-batch 16     # sdxl-turbo, the authors' settings

Frames are a rendered talking head (pipeline.sources.demo). On the tiny profile the numbers measure the
pipeline's overheads and the batching gain, not SDXL's cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sources.demo import make_identity, render_clip  # noqa: E402
from pipeline.stages.stylise import StyliseStage, denoising_steps  # noqa: E402
from pipeline.weights import DEFAULT_TINY_DIR, ensure_tiny_weights  # noqa: E402

log = logging.getLogger("benchmarks.stage_stylise")
# The demo's stylisation settings (configs/data/demo.yaml): see docs/stage_stylise.md for why.
DEMO_OPTIONS = {"size": 128, "steps": 2, "strength": 0.5}


def demo_frames(count: int, resolution: int) -> np.ndarray:
    frames, _, _ = render_clip(make_identity(0), count, (resolution, resolution), 0.45 * resolution, 1.0, 0)
    return frames


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores"


def _time_clip(stage: StyliseStage, frames: np.ndarray, frame_batch: int) -> tuple[float, np.ndarray]:
    stage.frame_batch = frame_batch
    row = {"frames": frames, "clip_id": "bench", "bucket": "style", "key": "bench"}
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = stage.process(row)["driving_frames"]
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench(
    weights_dir: str | Path, frames: np.ndarray, frame_batch: int = 8, **options: Any
) -> dict[str, Any]:
    """frames/s of the stage on `frames` (uint8 [T,R,R,3]) batched by `frame_batch` and one by one."""
    options = {**DEMO_OPTIONS, **options}
    stage = StyliseStage(str(weights_dir), frame_batch=frame_batch, **options)
    _time_clip(stage, frames[: min(len(frames), frame_batch)], frame_batch)  # warm-up (allocations, kernels)
    batched_s, batched = _time_clip(stage, frames, frame_batch)
    single_s, single = _time_clip(stage, frames, 1)
    count = len(frames)
    return {
        "stage": "stylise",
        "device": torch.cuda.get_device_name() if stage.device.type == "cuda" else f"cpu ({cpu_name()})",
        "torch_threads": torch.get_num_threads(),
        "dtype": str(stage.dtype).replace("torch.", ""),
        "weights": stage.weights_id,
        "frames": count,
        "resolution": int(frames.shape[1]),
        "size": stage.size,
        "steps": stage.steps,
        "strength": stage.strength,
        "denoising_steps": denoising_steps(stage.steps, stage.strength),
        "guidance_scale": stage.guidance_scale,
        "frame_batch": frame_batch,
        "batched_fps": round(count / batched_s, 3),
        "single_fps": round(count / single_s, 3),
        "speedup": round(single_s / batched_s, 3),
        # Same seed, same frames: batching changes float summation order only (<= 1 grey level).
        "max_abs_diff_batched_vs_single": int(
            np.abs(batched.astype(np.int16) - single.astype(np.int16)).max()
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--weights-dir", default=None, help="tiny: cache folder by default; full: required")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=256, help="frame side R (demo 256, real data 512)")
    parser.add_argument("--frame-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=DEMO_OPTIONS["size"])
    parser.add_argument("--steps", type=int, default=DEMO_OPTIONS["steps"])
    parser.add_argument("--strength", type=float, default=DEMO_OPTIONS["strength"])
    parser.add_argument("--guidance-scale", type=float, default=0.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.profile == "tiny":
        weights_dir = ensure_tiny_weights(
            Path(args.weights_dir) if args.weights_dir else DEFAULT_TINY_DIR, ["sdxl_turbo"]
        )
    elif not args.weights_dir:
        parser.error("--profile full needs --weights-dir")
    else:
        weights_dir = Path(args.weights_dir)
    result = bench(
        weights_dir,
        demo_frames(args.frames, args.resolution),
        frame_batch=args.frame_batch,
        size=args.size,
        steps=args.steps,
        strength=args.strength,
        guidance_scale=args.guidance_scale,
        device=args.device,
        dtype=args.dtype,
    )
    result["profile"] = args.profile
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
