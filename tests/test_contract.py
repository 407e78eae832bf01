from __future__ import annotations

import numpy as np
import pytest

from pipeline import contract
from pipeline.contract import SampleMeta


def meta(**changes) -> SampleMeta:
    base = dict(
        key="k", clip_id="c", dataset="vfhq", identity="i", source="/s", fps=25.0, num_frames=3, segment=0,
        frame_start=0, frame_stop=3, crop_box=[0, 0, 8, 8], resolution=8, bucket="real",
    )  # fmt: skip
    return SampleMeta(**{**base, **changes})


def test_mask_round_trip_is_exact_and_small() -> None:
    mask = np.random.default_rng(0).random((5, 128, 96)) > 0.5
    data = contract.encode_mask(mask)
    assert np.array_equal(contract.decode_mask(data), mask)
    assert len(data) < mask.size / 7  # bit-packed: about one bit per pixel


def test_mask_encoding_checks_its_input() -> None:
    with pytest.raises(ValueError, match="bool \\[T,H,W\\]"):
        contract.encode_mask(np.zeros((2, 4, 4), np.uint8))


def test_gaze_round_trip_keeps_nan() -> None:
    gaze = np.array([[0.1, -0.2], [np.nan, np.nan]], np.float32)
    out = contract.decode_gaze(contract.encode_gaze(gaze))
    assert out.dtype == np.float32 and np.array_equal(out, gaze, equal_nan=True)


def test_meta_round_trip() -> None:
    original = meta(gaze_scores={"authors": 12.5}, annotations=["face_mask"], weights={"parsenet": "tiny"})
    assert SampleMeta.from_json_bytes(original.to_json_bytes()) == original


def test_sample_keys_are_tar_safe_and_distinct() -> None:
    key = contract.sample_key("demo/vfhq", "Clip+abc.d+P0+C1+F0-10", 2)
    assert "." not in key and "/" not in key and key.endswith("__s002")
    assert contract.sample_key("vfhq", "a", 0) != contract.sample_key("celebvhq", "a", 0)


def test_required_members_follow_bucket_and_annotations() -> None:
    assert contract.required_members(meta()) == {contract.REAL, contract.META}
    full = meta(bucket="swap", annotations=["face_mask", "foreground", "gaze", "swap"])
    assert contract.required_members(full) == {
        contract.REAL, contract.META, contract.FACE_MASK, contract.FG_MASK, contract.GAZE, contract.SWAP,
    }  # fmt: skip
