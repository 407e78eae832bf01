"""Face-mask stage on the tiny profile: facexlib's own loader reading random-weight ParseNet / BiSeNet
files, label selection, box mode, and failures becoming failure rows."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from parsing_helpers import SIZE, clip, make_row, rigged_parsenet_dir

from pipeline.rows import batch_to_rows, rows_to_batch
from pipeline.stages.face_mask import (
    FACE_LABELS,
    FaceMaskStage,
    box_masks,
    label_ids,
    write_tiny_parsenet,
)
from pipeline.weights import MissingWeights, ensure_tiny_weights, load_weight_specs

OPTIONS = {"input_size": SIZE, "frame_batch": 4, "device": "cpu"}


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    return ensure_tiny_weights(tmp_path_factory.mktemp("weights"), ["parsenet", "bisenet"], seed=0)


@pytest.fixture(scope="session")
def stage(weights_dir) -> FaceMaskStage:
    return FaceMaskStage(str(weights_dir), **OPTIONS)


@pytest.mark.parametrize("model", ["parsenet", "bisenet"])
def test_facexlib_loader_reads_the_tiny_file(weights_dir, model):
    stage = FaceMaskStage(str(weights_dir), model=model, **OPTIONS)
    written = torch.load(weights_dir / load_weight_specs()[model].path, weights_only=True)
    loaded = stage.parser.net.state_dict()
    assert list(written) == list(loaded)
    assert all(torch.equal(written[k], loaded[k].cpu()) for k in written)
    out = stage.process(make_row(clip(2)))
    assert out["face_mask"].shape == (2, SIZE, SIZE) and out["face_mask"].dtype == np.bool_
    assert json.loads(out["weights"]) == {model: stage.parser.weights_id}


def test_tiny_writer_is_seeded(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_tiny_parsenet(tmp_path / name, seed)
    a, b, c = (torch.load(tmp_path / n, weights_only=True) for n in "abc")
    key = "out_mask_conv.conv2d.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_outputs_and_determinism(weights_dir, stage):
    frames = clip(3)
    first = stage.process(make_row(frames))
    again = FaceMaskStage(str(weights_dir), **OPTIONS).process(make_row(frames))
    assert first["face_mask"].shape == (3, SIZE, SIZE) and first["face_mask"].dtype == np.bool_
    np.testing.assert_array_equal(first["face_mask"], again["face_mask"])
    labels = stage.parser.parse(frames)
    np.testing.assert_array_equal(first["face_mask"], np.isin(labels, label_ids("parsenet", FACE_LABELS)))
    extra = json.loads(first["extra"])
    assert extra["face_mask_mode"] == "parsing"
    assert extra["face_mask_empty_frames"] == int((~first["face_mask"].any(axis=(1, 2))).sum())


def test_label_selection_and_a_clip_without_face(tmp_path):
    weights = rigged_parsenet_dir(tmp_path, "hair")  # every pixel parses as hair: no face anywhere
    frames = clip(3)
    out = FaceMaskStage(str(weights), **OPTIONS).process(make_row(frames))
    assert not out["face_mask"].any()
    assert json.loads(out["extra"])["face_mask_empty_frames"] == 3
    for labels in (["hair"], [13]):  # a name, or ParseNet's own id for hair
        assert (
            FaceMaskStage(str(weights), labels=labels, **OPTIONS).process(make_row(frames))["face_mask"].all()
        )


def test_label_tables_differ_per_model():
    assert label_ids("parsenet", ["hair", "nose"]) == [2, 13]
    assert label_ids("bisenet", ["hair", "nose"]) == [10, 17]
    with pytest.raises(ValueError, match="unknown parsing label 'beard'"):
        label_ids("parsenet", ["beard"])
    with pytest.raises(ValueError, match="labels"):
        label_ids("bisenet", [19])


def test_frame_step_copies_the_nearest_parsed_frame(weights_dir):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    every = FaceMaskStage(str(weights_dir), **OPTIONS).parser.parse(frames)
    stepped = FaceMaskStage(str(weights_dir), frame_step=2, **OPTIONS).parser.parse(frames)
    np.testing.assert_array_equal(stepped[[0, 1]], every[[0, 0]])
    np.testing.assert_array_equal(stepped[[2, 3]], every[[2, 2]])


def test_every_bucket_and_a_failure_row(stage):
    rows = [make_row(clip(2), bucket=b, key=b) for b in ("real", "swap", "style")]
    bad = make_row(np.zeros((2, SIZE, SIZE), np.uint8), key="bad")  # grayscale: not [T,H,W,3]
    out = batch_to_rows(stage(rows_to_batch([*rows, bad])))
    for row in out[:3]:
        assert row["error_stage"] == ""
        assert row["face_mask"].shape == (2, SIZE, SIZE)
        assert "face_mask" in json.loads(row["annotations"])
    assert out[3]["error_stage"] == "face_mask" and "expected frames" in out[3]["message"]
    assert len(out[3]["face_mask"]) == 0


def test_missing_and_corrupt_weights(tmp_path, weights_dir):
    with pytest.raises(MissingWeights, match="parsing_parsenet.pth"):
        FaceMaskStage(str(tmp_path), **OPTIONS)
    assert not any(tmp_path.rglob("*.pth"))  # refused before facexlib could download anything
    target = tmp_path / load_weight_specs()["parsenet"].path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot load parsenet weights"):
        FaceMaskStage(str(tmp_path), **OPTIONS)
    target.write_bytes((weights_dir / load_weight_specs()["bisenet"].path).read_bytes())  # wrong layout
    with pytest.raises(RuntimeError, match="cannot load parsenet weights"):
        FaceMaskStage(str(tmp_path), **OPTIONS)


def test_box_mode(tmp_path):
    stage = FaceMaskStage(str(tmp_path), mode="box")  # no weights read
    assert FaceMaskStage.weights_needed({"mode": "box"}) == []
    assert FaceMaskStage.weights_needed({"model": "bisenet"}) == ["bisenet"]
    boxes = json.dumps([[10, 20, 30, 50], None, [-5.5, -5.5, 8, 8]])
    out = stage.process(make_row(clip(3), face_boxes=boxes))
    mask = out["face_mask"]
    assert mask[0].sum() == 20 * 30 and mask[0, 20:50, 10:30].all()
    assert not mask[1].any() and mask[2, :8, :8].all() and mask[2].sum() == 64
    assert json.loads(out["extra"]) == {"face_mask_mode": "box", "face_mask_empty_frames": 1}
    centre = stage.process(make_row(clip(1)))["face_mask"][0]  # no boxes: the clip is a face crop
    side = round(0.8 * SIZE)
    assert centre.sum() == side * side and centre[SIZE // 2, SIZE // 2]
    assert box_masks([[0, 0, 10, 10]], 1, (SIZE, SIZE), 2.0, 0.8)[0].sum() == 15 * 15
    with pytest.raises(ValueError, match="2 boxes for 3 frames"):
        box_masks([[0, 0, 1, 1]] * 2, 3, (SIZE, SIZE), 1.0, 0.8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": "red"}, "unknown option"),
        ({"mode": "ellipse"}, "mode must be"),
        ({"model": "unet"}, "model must be"),
        ({"labels": ["beard"]}, "unknown parsing label"),
        ({"mode": "box", "centre_box": 0}, "centre_box"),
    ],
)
def test_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        FaceMaskStage(str(tmp_path), **options)


def test_bad_parser_options(weights_dir):
    with pytest.raises(ValueError, match="input_size must be a multiple of 32"):
        FaceMaskStage(str(weights_dir), input_size=100)
    with pytest.raises(ValueError, match="frame_batch"):
        FaceMaskStage(str(weights_dir), frame_batch=0)
