"""AKD under FOMM's convention (face-alignment's 2D-FAN at 256², mean absolute error per coordinate): the
arithmetic on known shifts, the FAN path on a real photo with the tiny FAN, the loader's checks, self
reenactment scoring 0 and cross reenactment carrying no AKD at all."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation import face_metrics, keypoints
from evaluation.frames import read_frames
from evaluation.scoring import Evaluator
from pipeline.weights import MissingWeights, ensure_tiny_weights


@pytest.fixture(scope="module")
def fan_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder holding only the tiny FAN (the other networks' metrics are skipped: fast)."""
    return ensure_tiny_weights(tmp_path_factory.mktemp("fan_weights"), [keypoints.FAN_2D])


@pytest.fixture(scope="module")
def fan(fan_weights: Path) -> keypoints.FanLandmarks:
    return keypoints.load_fan(fan_weights, "cpu")


def test_fomm_akd_of_known_shifts_is_the_mean_absolute_coordinate_error() -> None:
    rng = np.random.default_rng(0)
    points = rng.uniform(60, 200, (3, 68, 2)).astype(np.float32)  # 3 frames, at 256²
    for s in (1.0, 4.0, 10.0):
        moved = points + np.float32([s, 0])
        assert np.allclose(keypoints.fomm_akd(moved, points), s / 2)  # |Δx| = s, |Δy| = 0
        assert np.allclose(face_metrics.keypoint_distance(moved, points), s)  # the Euclidean form: s
    # A diagonal move (3, 4): FOMM 3.5, Euclidean 5.
    assert np.allclose(keypoints.fomm_akd(points + np.float32([3, 4]), points), 3.5)
    # Landmarks of a 512² frame shifted by 2s px score s/2 once mapped to 256²; at 512² Euclidean: 2s.
    at_512 = points * 2
    for s in (2.0, 6.0):
        shifted = keypoints.rescale_points(at_512 + np.float32([2 * s, 0]), 512, 512, keypoints.FOMM_SIZE)
        base = keypoints.rescale_points(at_512, 512, 512, keypoints.FOMM_SIZE)
        assert np.allclose(keypoints.fomm_akd(shifted, base), s / 2)
        assert np.allclose(face_metrics.keypoint_distance(at_512 + np.float32([2 * s, 0]), at_512), 2 * s)


def face_window(photos: Path, shift: int) -> np.ndarray:
    """A 512² frame of obama.jpg (halved, padded) with the face in the middle; `shift` px to the right."""
    photo = read_frames(photos / "obama.jpg")[0]
    half = cv2.resize(photo, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    canvas = cv2.copyMakeBorder(half, 200, 200, 200, 200, cv2.BORDER_REFLECT)
    top, left = 200 + 138 - 256, 200 + 241 - 256  # the face (dlib's box centre on the halved photo)
    return np.ascontiguousarray(canvas[top : top + 512, left - shift : left - shift + 512])


def test_fan_on_a_real_photo_scores_half_the_shift_at_256(photos: Path, fan, dlib_backend) -> None:
    """FOMM's pipeline end to end with our boxes: a 512² frame shifted by 8 px is resized to 256² (4 px
    there) and the FAN (same crop content, shifted) gives points shifted by exactly that: AKD 2, the hand
    computation's s/2 (two frames: the FAN is full width, slow on a CPU)."""
    shifts = (0, 8)
    frames = np.stack([face_window(photos, s) for s in shifts])
    base = dlib_backend.analyse(frames[:1])
    assert base.found[0]
    boxes = np.stack([base.boxes[0] + np.float32([s, 0, s, 0]) for s in shifts])
    points = fan.points_at_256(frames, boxes)
    assert np.isfinite(points).all() and points.shape == (2, 68, 2)
    assert np.allclose(keypoints.fomm_akd(points[1:], points[:1]), 2.0, atol=0.02)
    assert np.allclose(points[1] - points[0], [4, 0], atol=1)  # every point moved 4 px right at 256²


def test_fan_loader_reads_the_tiny_file_and_rejects_any_other(fan_weights: Path, fan, tmp_path: Path) -> None:
    from face_alignment.models import FAN

    net = fan.aligner.face_alignment_net
    assert isinstance(net, FAN) and fan.weights_id == "tiny" and net.num_modules == 1
    assert net.l0.out_channels == 68  # 68 heatmaps (64² from a 256² crop), as 2DFAN4's last head
    with pytest.raises(MissingWeights, match="2DFAN4-11f355bf06.pth.tar"):
        keypoints.load_fan(tmp_path, "cpu")
    # The same FAN state dict without the tiny mark: another sha256 than the manifest's, refused.
    state = torch.load(keypoints.fan_path(fan_weights), weights_only=True)
    del state._metadata[""][keypoints.TINY_MARK]
    path = keypoints.fan_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    with pytest.raises(ValueError, match="wrong sha256.*11f355bf0693120222f5955ce3f9dc8f.*weights fetch"):
        keypoints.load_fan(tmp_path, "cpu")


def test_self_reenactment_scores_akd_zero(carphone: np.ndarray, fan_weights: Path) -> None:
    """The same frames in give the same points: AKD 0 under both conventions, named with their units and
    conventions in metrics.json."""
    clip = carphone[:1]  # the FAN is full width (random weights): one frame keeps this short on a CPU
    evaluator = Evaluator(fan_weights, "dlib", "cpu")
    scores = evaluator.score_clip(clip, clip.copy())
    assert (scores.frames["akd"] == 0).all() and (scores.frames["akd_euclid_512"] == 0).all()
    summary = evaluator.summarise([scores])
    assert summary["metrics"]["akd"] == 0.0 and summary["samples"]["akd_frames"] == 1
    assert summary["units"]["akd"].startswith("px at 256²") and "512²" in summary["units"]["akd_euclid_512"]
    assert summary["conventions"]["akd"]["resolution"] == "256x256"
    assert summary["conventions"]["akd_euclid_512"]["source"] == "ours"
    assert summary["weights"][keypoints.FAN_2D] == "tiny"
    assert summary["conventions"]["csim"]["backbone"].startswith("dlib_face_recognition_resnet_model_v1")


def test_without_the_fan_akd_is_skipped_naming_the_file(carphone: np.ndarray, tmp_path: Path) -> None:
    evaluator = Evaluator(tmp_path, "dlib", "cpu")
    summary = evaluator.summarise([evaluator.score_clip(carphone[:1], carphone[:1].copy())])
    assert summary["metrics"]["akd"] is None and "2DFAN4-11f355bf06.pth.tar" in summary["skipped"]["akd"]
    assert summary["metrics"]["akd_euclid_512"] == 0.0  # ours needs no extra weights


def test_cross_reenactment_carries_no_akd(photos: Path, fan_weights: Path) -> None:
    obama, biden = (
        cv2.resize(read_frames(photos / n)[0], (256, 320), interpolation=cv2.INTER_AREA)[None]
        for n in ("obama.jpg", "biden.jpg")
    )
    evaluator = Evaluator(fan_weights, "dlib", "cpu")
    scores = evaluator.score_clip(obama, None, reference=obama, driving=biden)
    summary = evaluator.summarise([scores])
    for name in ("akd", "akd_euclid_512"):
        assert name not in scores.frames and name not in scores.skipped
        for block in ("metrics", "samples", "skipped", "units", "conventions"):
            assert not any(key.startswith(name) for key in summary[block]), (block, summary[block])
    assert keypoints.FAN_2D not in summary["weights"]  # the FAN is not even loaded
    assert summary["metrics"]["csim"] is not None and "csim" in summary["conventions"]
