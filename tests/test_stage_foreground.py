"""Foreground stage: backend choice, the parsing backend on tiny facexlib weights, and the DensePose
backend's clear error where detectron2 is not installed (it cannot be installed on this machine)."""

import json
from pathlib import Path

import numpy as np
import pytest
from parsing_helpers import SIZE, clip, make_row, rigged_parsenet_dir

from pipeline.rows import batch_to_rows, rows_to_batch
from pipeline.stages.face_mask import FaceParser
from pipeline.stages.foreground import (
    DENSEPOSE_WEIGHTS,
    DensePoseUnavailable,
    ForegroundStage,
    densepose_import_error,
    resolve_backend,
)
from pipeline.weights import ensure_tiny_weights

OPTIONS = {"backend": "parsing", "input_size": SIZE, "frame_batch": 4, "device": "cpu"}
HAS_DENSEPOSE = densepose_import_error() is None


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    return ensure_tiny_weights(tmp_path_factory.mktemp("fg_weights"), ["parsenet"], seed=0)


@pytest.fixture(scope="session")
def stage(weights_dir) -> ForegroundStage:
    return ForegroundStage(str(weights_dir), **OPTIONS)


def test_auto_backend_follows_what_imports():
    expected = "densepose" if HAS_DENSEPOSE else "parsing"
    assert resolve_backend("auto") == expected
    assert ForegroundStage.weights_needed({}) == ([DENSEPOSE_WEIGHTS] if HAS_DENSEPOSE else ["parsenet"])
    assert ForegroundStage.weights_needed({"backend": "parsing", "parsing_model": "bisenet"}) == ["bisenet"]
    assert ForegroundStage.weights_needed({"backend": "densepose"}) == [DENSEPOSE_WEIGHTS]
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("sam")


@pytest.mark.skipif(HAS_DENSEPOSE, reason="detectron2 + densepose are installed here")
def test_densepose_selected_and_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DensePoseUnavailable) as info:
        ForegroundStage(str(tmp_path), backend="densepose", device="cpu")
    message = str(info.value)
    assert "detectron2" in message and "subdirectory=projects/DensePose" in message
    assert "backend=parsing" in message


@pytest.mark.skipif(HAS_DENSEPOSE, reason="detectron2 + densepose are installed here")
def test_auto_runs_the_parsing_backend_without_detectron2(weights_dir):
    stage = ForegroundStage(str(weights_dir), backend="auto", input_size=SIZE, device="cpu")
    out = stage.process(make_row(clip(1)))
    assert out["fg_backend"] == "parsing" and out["fg_mask"].shape == (1, SIZE, SIZE)


def test_parsing_backend_is_the_union_of_non_background_labels(weights_dir, stage):
    frames = clip(3)
    out = stage.process(make_row(frames))
    again = ForegroundStage(str(weights_dir), **OPTIONS).process(make_row(frames))
    assert out["fg_mask"].shape == (3, SIZE, SIZE) and out["fg_mask"].dtype == np.bool_
    np.testing.assert_array_equal(out["fg_mask"], again["fg_mask"])
    labels = FaceParser(weights_dir, "parsenet", "cpu", SIZE, 4, 1).parse(frames)
    np.testing.assert_array_equal(out["fg_mask"], labels != 0)
    assert out["fg_backend"] == "parsing"
    assert json.loads(out["weights"]) == {"parsenet": stage.parser.weights_id}


@pytest.mark.parametrize(("label", "expected"), [("background", False), ("cloth", True)])
def test_nothing_and_everything_in_the_foreground(tmp_path, label, expected):
    weights = rigged_parsenet_dir(tmp_path, label)
    out = ForegroundStage(str(weights), **OPTIONS).process(make_row(clip(2)))
    assert (out["fg_mask"] == expected).all()
    assert json.loads(out["extra"])["fg_empty_frames"] == (0 if expected else 2)


def test_every_bucket_and_a_failure_row(stage):
    rows = [make_row(clip(1), bucket=b, key=b) for b in ("real", "swap", "style")]
    bad = make_row(np.zeros((1, SIZE, SIZE, 4), np.uint8), key="bad")  # RGBA: not [T,H,W,3]
    out = batch_to_rows(stage(rows_to_batch([*rows, bad])))
    for row in out[:3]:
        assert row["error_stage"] == "" and row["fg_backend"] == "parsing"
        assert row["fg_mask"].shape == (1, SIZE, SIZE)
        assert "foreground" in json.loads(row["annotations"])
    assert out[3]["error_stage"] == "foreground" and out[3]["fg_backend"] == ""
    assert len(out[3]["fg_mask"]) == 0


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        ForegroundStage(str(tmp_path), backend="parsing", model="parsenet")
    with pytest.raises(ValueError, match="parsing_model must be"):
        ForegroundStage(str(tmp_path), parsing_model="segformer")
    with pytest.raises(ValueError, match="score_threshold"):
        ForegroundStage(str(tmp_path), score_threshold=2)
