"""Face-swap stage throughput: frames/s with frame_batch=N against one frame at a time, same run, JSON.

    python benchmarks/stage_face_swap.py                  # tiny profile, CPU, one 48-frame 256² clip
    python benchmarks/stage_face_swap.py --demo           # also: the demo build's swap share, end to end
    python benchmarks/stage_face_swap.py --weights-dir $WEIGHTS_DIR --device cuda --resolution 512

SCRFD and INSwapper graphs take one image per run, so `frame_batch` frames run on threads (ONNX
Runtime releases the GIL) rather than as one tensor batch; the figure says whether that pays.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.identity_bank import BANK_COLUMNS  # noqa: E402
from pipeline.stages.face_swap import ARCFACE, INSWAPPER, SCRFD, FaceSwapStage  # noqa: E402
from pipeline.weights import ensure_tiny_weights  # noqa: E402


def _random_bank(path: Path) -> Path:
    """Two identities with random unit embeddings: the swap's cost does not depend on them."""
    rng = np.random.default_rng(0)
    rows = []
    for identity in ("bench-a", "bench-b"):
        vector = rng.normal(size=512).astype(np.float32)
        normed = vector / np.linalg.norm(vector)
        rows.append(dict(identity=identity, dataset="bench", clip_id=identity, frames_used=1, skip_reason="",
                         arcface_weights="random", embedding=vector, normed=normed))  # fmt: skip
    pd.DataFrame(rows, columns=BANK_COLUMNS).to_parquet(path, index=False)
    return path


def _clip_row(frames: np.ndarray, boxes: np.ndarray | None) -> dict:
    return {
        "frames": frames,
        "face_boxes": json.dumps(boxes.tolist()) if boxes is not None else "",
        "bucket": "swap",
        "clip_id": "bench",
        "dataset": "bench",
        "identity": "bench-a",
        "key": "bench",
        "extra": "",
        "weights": "",
    }


def bench(
    weights_dir: str | Path,
    frames: np.ndarray,
    face_boxes: np.ndarray | None = None,
    frame_batch: int = 4,
    device: str = "auto",
    repeats: int = 2,
) -> dict:
    """frames/s of the stage on one clip (uint8 [T,R,R,3]), batched vs one frame at a time."""
    result: dict = {
        "frames": int(len(frames)),
        "resolution": int(frames.shape[1]),
        "frame_batch": frame_batch,
    }
    with tempfile.TemporaryDirectory() as tmp:
        bank = _random_bank(Path(tmp) / "identities.parquet")
        for label, batch in (("batched", frame_batch), ("one_at_a_time", 1)):
            stage = FaceSwapStage(str(weights_dir), str(bank), frame_batch=batch, device=device)
            stage.process(_clip_row(frames[:2], None if face_boxes is None else face_boxes[:2]))  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = stage.process(_clip_row(frames, face_boxes))
                times.append(time.perf_counter() - start)
            result[f"{label}_frames_per_s"] = round(len(frames) / min(times), 2)
            result["frames_without_face"] = json.loads(out["extra"])["swap_frames_without_face"]
            result["providers"] = stage.providers
            result["weights"] = stage.weights
    result["speedup"] = round(result["batched_frames_per_s"] / result["one_at_a_time_frames_per_s"], 3)
    return result


def demo_share(weights_dir: Path, workdir: Path, device: str = "auto") -> dict:
    """The demo build's swap work: identity bank over the demo manifest + the stage on its swap rows."""
    from pipeline.config import load_build_config
    from pipeline.identity_bank import build_identity_bank
    from pipeline.manifest import build_manifest
    from pipeline.segment import decode_segment
    from pipeline.sources.demo import scan_demo

    config = load_build_config("demo")
    manifest, _ = build_manifest(scan_demo(workdir / "demo", config.demo), config)
    start = time.perf_counter()
    bank_path = workdir / "identities.parquet"
    build_identity_bank(manifest, config.resolution, config.crop_scale, weights_dir, bank_path, device=device)
    bank_s = time.perf_counter() - start
    swap_rows = manifest[manifest["bucket"] == "swap"].to_dict("records")
    decoded = [
        decode_segment(dict(row, extra="", weights=""), config.resolution, config.crop_scale)
        for row in swap_rows
    ]
    start = time.perf_counter()
    stage = FaceSwapStage(str(weights_dir), str(bank_path), device=device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    without = 0
    for row in decoded:
        without += json.loads(stage.process(row)["extra"])["swap_frames_without_face"]
    swap_s = time.perf_counter() - start
    frames = sum(len(row["frames"]) for row in decoded)
    return {
        "segments": len(manifest),
        "swap_segments": len(decoded),
        "swap_frames": frames,
        "frames_without_face": without,
        "identity_bank_s": round(bank_s, 2),
        "stage_load_s": round(load_s, 2),
        "swap_s": round(swap_s, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights-dir", help="real weights folder; default: tiny weights in a temp folder")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--frame-batch", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--demo", action="store_true", help="also time the demo build's swap share")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.sources.demo import make_identity, render_clip

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights_dir) if args.weights_dir else ensure_tiny_weights(
            Path(tmp) / "weights", [SCRFD, ARCFACE, INSWAPPER]
        )  # fmt: skip
        size = args.resolution
        frames, _, _ = render_clip(make_identity(0), args.frames, (size, size), 0.45 * size, 0.5, seed=0)
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "profile": "full" if args.weights_dir else "tiny",
            "clip": bench(weights, frames, None, args.frame_batch, args.device),
        }
        if args.demo:
            result["demo"] = demo_share(weights, Path(tmp), args.device)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
