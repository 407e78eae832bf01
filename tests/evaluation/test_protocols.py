"""Evaluation protocols that can be set beside a published table: identity-leakage baseline on real
faces, cross-reenactment pairs of different people, FID / FVD sample sizes, per-video and per-frame
averages, PSNR's identical frames, units."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from evaluation.distribution import frechet_distance
from evaluation.frames import read_frames
from evaluation.outputs import markdown_table
from evaluation.scoring import Evaluator
from pipeline.video import read_video_frames

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))  # the trainer tests' synthetic shard writer


def face_square(photos: Path, name: str, backend, side: int = 320) -> np.ndarray:
    """[1, side, side, 3]: a square around the photo's face (twice the face box), so photos of different
    shapes become frames of one video without distorting the faces."""
    image = read_frames(photos / name)[0]
    faces = backend.analyse(image[None])
    assert faces.found[0], name
    x0, y0, x1, y1 = faces.boxes[0]
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    top, left = int(max(cy - half, 0)), int(max(cx - half, 0))
    crop = image[top : int(cy + half), left : int(cx + half)]
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)[None]


def test_identity_leak_baseline_on_obama_driven_by_biden(photos: Path, dlib_backend) -> None:
    """A generated face equal to the reference has normalised leakage 0 (it only scores the
    reference-driver similarity), one equal to the driver 1; the baseline is Obama-Biden's cosine."""
    evaluator = Evaluator(None, "dlib", "cpu")
    obama, biden = (face_square(photos, n, dlib_backend) for n in ("obama.jpg", "biden.jpg"))
    honest = evaluator.score_clip(obama, reference=obama, driving=biden, clip="reference-only")
    copied = evaluator.score_clip(biden, reference=obama, driving=biden, clip="driver-copied")
    other = evaluator.score_clip(
        face_square(photos, "obama2.jpg", dlib_backend), reference=obama, driving=biden
    )
    base = honest.pair["id_leak_base"]
    assert 0.7 < base < 0.9, base  # different people still score high with dlib's descriptor
    assert copied.pair["id_leak_base"] == pytest.approx(base, abs=1e-6)
    assert honest.pair["id_leak_norm"] == pytest.approx(0.0, abs=1e-5)
    assert copied.pair["id_leak_norm"] == pytest.approx(1.0, abs=1e-5)
    assert other.pair["id_leak_norm"] < 0.5, other.pair  # another Obama photo: far from the driver
    summary = evaluator.summarise([honest, copied])
    assert summary["metrics"]["id_leak_norm"] == pytest.approx(0.5, abs=1e-5)  # mean over the two pairs
    assert summary["metrics"]["id_leak_base"] == pytest.approx(base, abs=1e-6)
    assert summary["samples"]["id_leak_norm"] == 2
    # No ground truth: AKD against another person's face is not reported, not even as a key.
    assert not any(name.startswith("akd") for block in ("metrics", "skipped") for name in summary[block])


def test_self_reenactment_has_no_normalised_leak(photos: Path, dlib_backend) -> None:
    evaluator = Evaluator(None, "dlib", "cpu")
    obama = face_square(photos, "obama.jpg", dlib_backend)
    scores = evaluator.score_clip(obama, obama)
    assert "id_leak_norm" not in scores.pair and "same person" in scores.skipped["id_leak_norm"]
    assert np.isfinite(scores.frames["akd_euclid_512"]).all()  # self reenactment keeps AKD (no FAN here)


def test_cross_pairs_are_different_people_and_seeded() -> None:
    from evaluation.run import cross_pairs

    people = ["a", "a", "b", "c", "c", "c"]
    pairs = cross_pairs(people, seed=3)
    assert [drv for _, drv in pairs] == list(range(len(people)))
    assert all(people[ref] != people[drv] for ref, drv in pairs)
    assert cross_pairs(people, seed=3) == pairs
    assert any(cross_pairs(people, seed=s) != pairs for s in range(4, 10))  # the seed draws
    with pytest.raises(ValueError, match="2 identities"):
        cross_pairs(["a", "a"], seed=0)


def write_people_shards(out: Path, identities: list[str], frames: int = 12, size: int = 64) -> None:
    """A test split whose clips have the given identities (several clips per person)."""
    from shard_helpers import _row

    from pipeline.video import EncodeSettings
    from pipeline.writer import STATS_SUFFIX, encode_members, write_shard

    folder = out / "shards"
    folder.mkdir(parents=True)
    rows = []
    for i, who in enumerate(identities):
        row = _row(20 + i, "real", frames, size) | {"identity": who}
        rows.append(encode_members(row, size, EncodeSettings()))
    write_shard(rows, folder)
    for stats in folder.glob("*" + STATS_SUFFIX):
        stats.write_text(json.dumps({**json.loads(stats.read_text()), "split": "test"}))


@pytest.mark.slow
def test_run_cross_pairs_different_identities_and_names_small_samples(
    tmp_path: Path, tiny_eval_weights: Path
) -> None:
    from evaluation.run import RunOptions, evaluate_checkpoint
    from model.loading import write_tiny_weights

    model_dir = write_tiny_weights(tmp_path / "model", seed=0)
    shards = tmp_path / "shards_out"
    people = ["ann", "ann", "bob", "bob"]
    write_people_shards(shards, people)
    options = RunOptions(
        num_clips=4, num_frames=3, steps=1, stride=1, cross=True, grid_clips=0, resolution=64
    )
    out = tmp_path / "eval"
    table = evaluate_checkpoint(
        model_dir / "megactor",
        str(shards),
        out,
        options,
        "dlib",
        str(tiny_eval_weights),
        "cpu",
        str(model_dir),
    )
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert len(pairs) == 4
    assert (pairs["reference_identity"] != pairs["driving_identity"]).all(), pairs
    expected = {f"synthetic__clip{20 + i}__s000": who for i, who in enumerate(people)}
    assert pairs["reference_identity"].tolist() == [expected[k] for k in pairs["reference_clip"]]
    assert pairs["driving_identity"].tolist() == [expected[k] for k in pairs["driving_clip"]]
    summary = json.loads((out / "metrics.json").read_text())
    cross, own = summary["cross"], summary["self"]
    assert not any(name.startswith("akd") for block in ("metrics", "skipped") for name in cross[block])
    # 4 clips x 3 frames: FID from 12 frames, far below the protocol's N; FVD: every clip too short.
    assert "fid" not in own["metrics"] and own["samples"]["fid_n12"] == 12
    assert own["distribution"]["fid"] == {"protocol": "stylegan-v", "protocol_n": 50_000, "n": 12,
                                          "reported_as": "fid_n12"}  # fmt: skip
    assert own["metrics"]["fvd"] is None and own["distribution"]["fvd"]["short_videos_skipped"] == 4
    assert "fid_n12" in table and "(N=12)" in table and "apd_landmark [deg]" in table
    assert own["units"]["apd_landmark"] == "deg"


def test_fvd_skips_short_videos_and_carries_its_sample_count(
    carphone_path: Path, tiny_eval_weights: Path
) -> None:
    """Two 16-frame videos and one of 8 frames: FVD from 2 clips (the short one skipped, counted), named
    fvd_n2; FID from every frame, fid_n40."""
    long = read_video_frames(carphone_path, 0, 16)
    rng = np.random.default_rng(0)
    noisy = np.clip(long + rng.normal(0, 8, long.shape), 0, 255).astype(np.uint8)
    evaluator = Evaluator(tiny_eval_weights, "dlib", "cpu")
    scores = [
        evaluator.score_clip(noisy, long, clip="a"),
        evaluator.score_clip(long[::-1].copy(), long, clip="b"),
        evaluator.score_clip(noisy[:8], long[:8], clip="short"),
    ]
    summary = evaluator.summarise(scores)
    metrics = summary["metrics"]
    assert "fvd" not in metrics and np.isfinite(metrics["fvd_n2"]) and summary["samples"]["fvd_n2"] == 2
    assert "fid" not in metrics and summary["samples"]["fid_n40"] == 40
    fvd = summary["distribution"]["fvd"]
    assert fvd["short_videos_skipped"] == 1 and fvd["protocol_n"] == 2048 and fvd["clip_frames"] == 16


def test_protocol_covariance_divides_by_n() -> None:
    """StyleGAN's FeatureStats covariance (divided by N) against the general matrix square root."""
    from scipy import linalg

    rng = np.random.default_rng(5)
    for n in (5, 60):
        a, b = rng.normal(0, 1, (n, 6)), rng.normal(0.3, 1.5, (n, 6))
        cov_a, cov_b = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
        root = np.real(linalg.sqrtm(cov_a @ cov_b))
        expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
        assert frechet_distance(a, b, ddof=0) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance(a, b, ddof=0) != pytest.approx(frechet_distance(a, b), rel=1e-3)


def flat(value: int, count: int, size: int = 16) -> np.ndarray:
    return np.full((count, size, size, 3), value, np.uint8)


def test_identical_frames_are_counted_not_averaged_into_psnr(tmp_path: Path) -> None:
    evaluator = Evaluator(tmp_path, "insightface", "cpu")  # empty weights: pixel metrics only
    target = flat(100, 3)
    pred = target.copy()
    pred[0] += 10  # MSE 100; frames 1 and 2 identical
    summary = evaluator.summarise([evaluator.score_clip(pred, target)])
    expected = 10 * np.log10(255**2 / 100)
    assert summary["psnr_identical_frames"] == 2
    assert summary["metrics"]["psnr"] == pytest.approx(expected, abs=1e-4)
    assert summary["metrics"]["psnr_frames"] == pytest.approx(expected, abs=1e-4)
    assert summary["samples"]["psnr_frames"] == 1
    assert "2 frames identical" in markdown_table({"self": summary})
    same = evaluator.summarise([evaluator.score_clip(target, target)])
    assert same["metrics"]["psnr"] is None and "identical" in same["skipped"]["psnr"]
    assert same["psnr_identical_frames"] == 3


def test_per_video_and_per_frame_means_are_both_reported(tmp_path: Path) -> None:
    """One 1-frame video off by 10 (MSE 100) and one 3-frame video off by 20 (MSE 400)."""
    evaluator = Evaluator(tmp_path, "insightface", "cpu")
    short, long = flat(100, 1), flat(100, 3)
    clips = [
        evaluator.score_clip(short + 10, short, clip="one"),
        evaluator.score_clip(long + 20, long, clip="three"),
    ]
    summary = evaluator.summarise(clips)
    a, b = 10 * np.log10(255**2 / 100), 10 * np.log10(255**2 / 400)
    assert summary["metrics"]["psnr"] == pytest.approx((a + b) / 2, abs=1e-4)
    assert summary["metrics"]["psnr_frames"] == pytest.approx((a + 3 * b) / 4, abs=1e-4)
    assert summary["samples"]["psnr"] == 2 and summary["samples"]["psnr_frames"] == 4
    assert summary["metrics"]["l1"] == pytest.approx((10 + 20) / 2 / 255, abs=1e-6)
    assert summary["units"]["psnr"] == "dB" and summary["units"]["psnr_frames"] == "dB"
