"""The animate CLI's driving-video face masking uses the shard builder's face-mask stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from parsing_helpers import clip, rigged_parsenet_dir

from model.preprocess import mask_faces, prepare_driving


@pytest.mark.parametrize("label, kept", [("skin", True), ("hair", False)])
def test_facexlib_mask_keeps_face_pixels_and_blacks_out_the_rest(
    tmp_path: Path, label: str, kept: bool
) -> None:
    weights = rigged_parsenet_dir(tmp_path, label)  # every pixel parses as `label`
    frames = clip(2)
    out = mask_faces(
        frames, "facexlib", weights, "parsenet", "cpu", input_size=64
    )  # ParseNet is slow at 512 on CPU
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.array_equal(out, frames) if kept else not out.any()


def test_driving_preparation_masks_then_grays(tmp_path: Path) -> None:
    weights = rigged_parsenet_dir(tmp_path, "hair")
    driving = prepare_driving(clip(3), 32, "facexlib", weights, "parsenet", "cpu", parsing_size=64)
    assert driving.shape == (3, 3, 32, 32)
    assert driving.min() == driving.max() == -1.0  # all black after masking: -1 in model pixels


def test_facexlib_mask_needs_its_weights_folder() -> None:
    with pytest.raises(ValueError, match="face_weights"):
        mask_faces(clip(1), "facexlib")
    with pytest.raises(ValueError, match="expected one of"):
        mask_faces(clip(1), "retinaface")
