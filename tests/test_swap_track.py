"""The swap stage's face track: short detection gaps filled from the neighbours, smoothed over time,
and clips whose face is missing too often refused (pure numpy, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.face_swap import FaceTrackError, face_masks, fill_face_track


def track(num_frames: int, missing: list[int]) -> tuple[list, list, np.ndarray]:
    """A face moving right by 2 px a frame; `missing` frames have no detection."""
    kps = np.array([[38, 52], [74, 52], [56, 72], [42, 92], [70, 92]], np.float32)
    truth = np.stack([kps + [2.0 * t, 0.0] for t in range(num_frames)])
    boxes = [
        None if t in missing else np.array([20 + 2 * t, 30, 90 + 2 * t, 110], np.float32)
        for t in range(num_frames)
    ]
    return boxes, [None if t in missing else truth[t] for t in range(num_frames)], truth


def test_gaps_are_interpolated_and_ends_held():
    boxes, kpss, truth = track(12, missing=[0, 4, 5, 11])
    filled_boxes, filled = fill_face_track(boxes, kpss, 0.5, 3, smooth_sigma=0.0)
    assert filled.shape == (12, 5, 2) and filled_boxes.shape == (12, 4)
    assert np.allclose(filled[1:11], truth[1:11])  # the interior gap follows the motion
    assert np.allclose(filled[0], truth[1]) and np.allclose(filled[11], truth[10])  # held at the ends
    assert np.allclose(filled_boxes[4], [28, 30, 98, 110])


def test_smoothing_removes_jitter_and_keeps_a_still_face_still():
    rng = np.random.default_rng(0)
    boxes, kpss, truth = track(40, missing=[])
    noisy = [k + rng.normal(0, 1.5, k.shape).astype(np.float32) for k in kpss]
    _, raw = fill_face_track(boxes, noisy, 0.2, 12, smooth_sigma=0.0)
    _, smooth = fill_face_track(boxes, noisy, 0.2, 12, smooth_sigma=1.0)
    assert np.abs(smooth - truth).mean() < 0.7 * np.abs(raw - truth).mean()
    still = [kpss[0]] * 10
    _, held = fill_face_track([boxes[0]] * 10, still, 0.2, 12, smooth_sigma=2.0)
    assert np.allclose(held, kpss[0], atol=1e-4)  # no pull towards zero at the clip's ends


def test_too_many_or_too_long_gaps_are_refused():
    boxes, kpss, _ = track(10, missing=[1, 4, 7])
    with pytest.raises(
        FaceTrackError, match=r"no face detected in 3 of 10 frames \(0.30 > max_missing_fraction=0.2\)"
    ):
        fill_face_track(boxes, kpss, 0.2, 12, 1.0)
    boxes, kpss, _ = track(20, missing=[5, 6, 7, 8])
    with pytest.raises(FaceTrackError, match="4 consecutive frames without a face"):
        fill_face_track(boxes, kpss, 0.5, 3, 1.0)
    with pytest.raises(FaceTrackError, match="no face detected in any of the 3 frames"):
        fill_face_track([None] * 3, [None] * 3, 0.99, 12, 1.0)


def test_face_masks_are_read_from_the_row_when_the_face_mask_stage_ran():
    frames_shape = (3, 16, 16)
    assert face_masks({}, frames_shape) is None
    assert face_masks({"face_mask": np.zeros((0, 1, 1), bool)}, frames_shape) is None  # stage not run
    masks = np.zeros(frames_shape, bool)
    assert face_masks({"face_mask": masks}, frames_shape) is not None
    with pytest.raises(ValueError, match="face_mask has shape"):
        face_masks({"face_mask": np.zeros((2, 16, 16), bool)}, frames_shape)
