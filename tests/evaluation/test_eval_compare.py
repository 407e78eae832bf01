"""The insightface path and every network metric on tiny weights; `python -m evaluation compare` end to
end; a missing weights file skips its metric with the reason, nothing else."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.scoring import METRICS, Evaluator
from pipeline.video import encode_mp4

REPO = Path(__file__).resolve().parents[2]


def noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames.astype(float) + rng.normal(0, sigma, frames.shape), 0, 255).astype(np.uint8)


def test_insightface_path_scores_every_metric_on_tiny_weights(
    carphone: np.ndarray, tiny_eval_weights: Path
) -> None:
    """Every network but the FAN (not in the fixture's folder; FOMM's AKD: test_akd_fomm.py)."""
    clip = carphone[:3]  # the networks are full-size (random weights): few frames keep this short on a CPU
    evaluator = Evaluator(tiny_eval_weights, "insightface", "cpu")
    other = evaluator.score_clip(noisy(clip, 8), clip, clip="noisy")
    same = evaluator.score_clip(clip, clip, clip="same")
    summary = evaluator.summarise([other, same])
    # Self reenactment has no normalised leakage; 3-frame videos are shorter than FVD's 16-frame clip;
    # MediaPipe's landmarker has no tiny stand-in (tests/evaluation/test_expression.py), nor has the
    # shared tiny folder the FAN (tests/evaluation/test_akd_fomm.py).
    assert set(summary["skipped"]) == {"id_leak_norm", "fvd", "aed", "apd", "akd"}, summary["skipped"]
    assert summary["distribution"]["fvd"]["short_videos_skipped"] == 2
    assert summary["samples"]["fid_n6"] == 2 * len(clip)  # below the protocol's N: named with it
    names = set(METRICS) - {"id_leak_norm", "fvd", "fid", "aed", "apd", "akd"} | {"fid_n6"}
    assert all(math.isfinite(summary["metrics"][name]) for name in names), summary["metrics"]
    assert set(summary["weights"]) >= {
        "arcface_r50",
        "landmark_2d106",
        "lpips_alexnet",
        "fid_inception",
        "fvd_i3d",
    }
    # The clip scored against itself: no reconstruction error, the same landmarks, pose and gaze.
    frames = same.frames
    assert (frames["l1"] == 0).all() and np.allclose(frames["lpips"], 0, atol=1e-6)
    assert frames["driving_face"].all() and np.allclose(
        frames[["akd_euclid_512", "apd_landmark", "aed_landmark", "gaze"]], 0, atol=1e-3
    )
    assert (other.frames["lpips"] > 0).all() and (other.frames["psnr"] < 40).all()


def weights_subset(source: Path, dest: Path, names: list[str]) -> Path:
    """A weights folder holding only the named files (symbolic links to the tiny ones)."""
    from pipeline.weights import load_weight_specs

    specs = load_weight_specs()
    for name in names:
        (dest / specs[name].path).parent.mkdir(parents=True, exist_ok=True)
        (dest / specs[name].path).symlink_to(source / specs[name].path)
    return dest


@pytest.mark.slow
def test_compare_cli_writes_metrics_and_frames(
    carphone: np.ndarray, tiny_eval_weights: Path, tmp_path: Path
) -> None:
    """dlib backend; the weights folder lacks FID's Inception, the FAN and L2CS: those three are skipped
    with the file named, the rest are numbers (FVD too has a reason: an 8-frame video is shorter than its
    clip; AED / APD: MediaPipe's landmarker is not in the folder)."""
    weights = weights_subset(tiny_eval_weights, tmp_path / "weights", ["lpips_alexnet", "fvd_i3d"])
    pred, target = tmp_path / "pred.mp4", tmp_path / "target.mp4"
    pred.write_bytes(encode_mp4(noisy(carphone, 6), 8.0))
    target.write_bytes(encode_mp4(carphone, 8.0))
    out = tmp_path / "result"
    cmd = [
        sys.executable, "-m", "evaluation", "compare", "--pred", str(pred), "--target", str(target),
        "--backend", "dlib", "--weights-dir", str(weights), "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["backend"] == "dlib" and summary["frames"] == len(carphone)
    skipped = summary["skipped"]
    assert set(skipped) == {"fid", "gaze", "fvd", "id_leak_norm", "aed", "apd", "akd"}, skipped
    assert (
        "face_landmarker" in skipped["aed"] or "eval-mediapipe" in skipped["aed"]
    )  # MediaPipe's model / package
    assert "2DFAN4-11f355bf06.pth.tar" in skipped["akd"]
    assert (
        "pt_inception-2015-12-05-6726825d.pth" in skipped["fid"] and "L2CSNet_gaze360.pkl" in skipped["gaze"]
    )
    assert "shorter than the protocol's 16-frame clip" in skipped["fvd"]
    assert all(summary["metrics"][name] is None for name in skipped)
    assert all(math.isfinite(summary["metrics"][name]) for name in set(METRICS) - set(skipped))
    assert (
        summary["metrics"]["psnr"] < 60 and summary["metrics"]["csim"] > 0.9
    )  # same man, re-encoded + noise
    frames = pd.read_parquet(out / "frames.parquet")
    assert len(frames) == len(carphone) and {
        "psnr",
        "lpips",
        "csim",
        "akd_euclid_512",
        "apd_landmark",
        "aed_landmark",
        "id_leak",
    } <= set(frames)


def test_compare_refuses_a_missing_video(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "evaluation", "compare", "--pred", str(tmp_path / "nope.mp4"), "--target",
         str(tmp_path / "nope.mp4"), "--backend", "dlib", "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "no such file" in result.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_an_empty_weights_folder_skips_every_network_metric_with_its_file(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    evaluator = Evaluator(tmp_path, "insightface", "cpu")
    summary = evaluator.summarise([evaluator.score_clip(noisy(frames, 10), frames)])
    assert all(math.isfinite(summary["metrics"][name]) for name in ("psnr", "ssim", "l1"))
    skipped = summary["skipped"]
    assert set(skipped) == set(METRICS) - {"psnr", "ssim", "l1"}, skipped
    assert "alexnet-owt-7be5be79.pth" in skipped["lpips"] and "i3d_torchscript.pt" in skipped["fvd"]
    for name in ("csim", "id_leak", "akd", "apd_landmark", "aed_landmark", "gaze"):  # every buffalo_l file
        assert "det_10g.onnx" in skipped[name] and "2d106det.onnx" in skipped[name], skipped[name]
    for name in ("aed", "apd"):  # MediaPipe's landmarker: the package or its file, and how to get them
        assert "FOR=eval" in skipped[name], skipped[name]
