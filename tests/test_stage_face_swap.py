"""The face-swap stage on the tiny profile: insightface's real loaders on our random-weight ONNX graphs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from swap_helpers import decoded_row, make_manifest

from pipeline.identity_bank import build_identity_bank
from pipeline.rows import batch_to_rows, rows_to_batch
from pipeline.stages.face_swap import ARCFACE, INSWAPPER, SCRFD, FaceSwapStage, load_face_analysis
from pipeline.weights import MissingWeights, ensure_tiny_weights, load_weight_specs

RESOLUTION = 128


@pytest.fixture(scope="session")
def swap_weights(tmp_path_factory):
    return ensure_tiny_weights(tmp_path_factory.mktemp("swap_weights"), [SCRFD, ARCFACE, INSWAPPER])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    clips = [
        dict(clip_id="a0", identity=0, num_frames=5),
        dict(clip_id="b0", identity=1, num_frames=5),
        dict(clip_id="c0", identity=2, num_frames=5, with_boxes=False),
        dict(clip_id="dark", identity=3, num_frames=4, black=True),
    ]
    return make_manifest(tmp_path_factory.mktemp("swap_clips"), clips)


@pytest.fixture(scope="module")
def bank_path(manifest, swap_weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "identities.parquet"
    build_identity_bank(manifest, RESOLUTION, 1.8, swap_weights, path, device="cpu")
    return path


@pytest.fixture(scope="module")
def stage(swap_weights, bank_path):
    return FaceSwapStage(str(swap_weights), str(bank_path), device="cpu")


def rows(manifest, bucket="swap"):
    return {r["clip_id"]: decoded_row(r, bucket, RESOLUTION) for r in manifest.to_dict("records")}


def test_tiny_files_route_like_the_real_ones(swap_weights):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.inswapper import INSwapper
    from insightface.model_zoo.scrfd import SCRFD as ScrfdModel

    specs = load_weight_specs()
    path = {name: swap_weights / specs[name].path for name in (SCRFD, ARCFACE, INSWAPPER)}
    for name, expected in ((SCRFD, ScrfdModel), (ARCFACE, ArcFaceONNX), (INSWAPPER, INSwapper)):
        assert onnx.load(str(path[name])).ir_version == 8
        assert type(get_model(str(path[name]), providers=["CPUExecutionProvider"])) is expected, name
    detector = get_model(str(path[SCRFD]), providers=["CPUExecutionProvider"])
    assert (len(detector.output_names), detector.fmc, detector._num_anchors, detector.use_kps) == (
        9,
        3,
        2,
        True,
    )
    recognizer = get_model(str(path[ARCFACE]), providers=["CPUExecutionProvider"])
    assert recognizer.input_size == (112, 112) and (recognizer.input_mean, recognizer.input_std) == (
        127.5,
        127.5,
    )
    swapper = get_model(str(path[INSWAPPER]), providers=["CPUExecutionProvider"])
    assert swapper.input_size == (128, 128) and swapper.emap.shape == (512, 512)
    assert onnx.load(str(path[INSWAPPER])).graph.initializer[-1].name == "emap"
    app = load_face_analysis(swap_weights, ["detection", "recognition"], ["CPUExecutionProvider"], 256, 0.5)
    assert sorted(app.models) == ["detection", "recognition"]


def test_swap_changes_the_face_and_keeps_shape(stage, manifest):
    row = rows(manifest)["a0"]
    frames = row["frames"].copy()
    out = stage.process(dict(row))
    driving = out["driving_frames"]
    assert driving.dtype == np.uint8 and driving.shape == frames.shape
    assert np.array_equal(out["frames"], frames)  # the real clip is untouched
    assert out["swap_source_identity"] not in ("", "person00")
    assert json.loads(out["extra"]) == {"swap_frames_without_face": 0}
    assert json.loads(out["weights"]) == {SCRFD: "tiny", ARCFACE: "tiny", INSWAPPER: "tiny"}
    boxes = np.asarray(json.loads(row["face_boxes"]))
    for t, (x0, y0, x1, y1) in enumerate(boxes.round().astype(int)):
        face_diff = np.abs(driving[t, y0:y1, x0:x1].astype(int) - frames[t, y0:y1, x0:x1]).mean()
        assert face_diff > 2.0, t
    changed = np.abs(driving.astype(int) - frames).sum(-1) > 0
    assert changed.mean() < 0.6  # pasted back into the face region, not the whole frame


def test_clip_without_dataset_boxes_is_swapped(stage, manifest):
    row = rows(manifest)["c0"]
    out = stage.process(dict(row))
    assert json.loads(out["extra"]) == {"swap_frames_without_face": 0}
    assert not np.array_equal(out["driving_frames"], row["frames"])


def test_deterministic_and_batching_does_not_change_results(stage, swap_weights, bank_path, manifest):
    row = rows(manifest)["b0"]
    first = stage.process(dict(row))
    again = stage.process(dict(row))
    one_by_one = FaceSwapStage(str(swap_weights), str(bank_path), frame_batch=1, device="cpu").process(
        dict(row)
    )
    assert np.array_equal(first["driving_frames"], again["driving_frames"])
    assert np.array_equal(first["driving_frames"], one_by_one["driving_frames"])
    assert first["swap_source_identity"] == one_by_one["swap_source_identity"]


def test_only_the_swap_bucket_pays_for_swapping(stage, manifest):
    decoded = [rows(manifest, bucket)["a0"] for bucket in ("real", "style", "swap")]
    for row, key in zip(decoded, ("real", "style", "swap"), strict=True):
        row["key"] = key
    calls = []
    swapper_get = stage.swapper.get

    def counting_get(*args, **kwargs):
        calls.append(1)
        return swapper_get(*args, **kwargs)

    stage.swapper.get = counting_get
    try:
        out = {row["key"]: row for row in batch_to_rows(stage(rows_to_batch(decoded)))}
    finally:
        del stage.swapper.get
    frames = decoded[0]["frames"]
    assert len(calls) == len(frames)  # one INSwapper call per frame of the swap row, none elsewhere
    for bucket in ("real", "style"):
        assert np.array_equal(out[bucket]["frames"], frames)
        assert out[bucket]["driving_frames"].shape == (0, 1, 1, 3)
        assert out[bucket]["swap_source_identity"] == ""
        assert "swap" not in json.loads(out[bucket]["annotations"])
    assert out["swap"]["driving_frames"].shape == frames.shape
    assert json.loads(out["swap"]["annotations"]) == ["swap"]


def test_clip_without_a_face_keeps_its_frames(stage, manifest):
    row = rows(manifest)["dark"]
    calls_before = stage.swap_calls
    out = stage.process(dict(row))
    assert np.array_equal(out["driving_frames"], row["frames"])
    assert json.loads(out["extra"]) == {"swap_frames_without_face": len(row["frames"])}
    assert stage.swap_calls == calls_before


def test_face_far_from_the_dataset_box_is_not_swapped(stage, manifest):
    row = rows(manifest)["a0"]
    row["face_boxes"] = json.dumps([[0.0, 0.0, 6.0, 6.0]] * len(row["frames"]))  # a box with no face
    out = stage.process(row)
    assert np.array_equal(out["driving_frames"], row["frames"])
    assert json.loads(out["extra"])["swap_frames_without_face"] == len(row["frames"])


def test_failure_becomes_a_failure_row(swap_weights, manifest, tmp_path):
    # A bank holding only the clip's own identity: no source can be drawn for it.
    solo = tmp_path / "solo.parquet"
    bank = build_identity_bank(manifest.iloc[:1], RESOLUTION, 1.8, swap_weights, solo, device="cpu")
    assert list(bank["identity"]) == ["person00"]
    stage = FaceSwapStage(str(swap_weights), str(solo), device="cpu")
    decoded = rows(manifest)
    good, bad = decoded["b0"], decoded["a0"]
    out = batch_to_rows(stage(rows_to_batch([bad, good])))
    assert out[0]["error_stage"] == "swap" and "no identity other than 'person00'" in out[0]["message"]
    assert out[0]["frames"].shape == (0, 1, 1, 3)
    assert out[1]["error_stage"] == "" and out[1]["swap_source_identity"] == "person00"


def test_missing_and_corrupt_weights_give_clear_errors(swap_weights, bank_path, tmp_path):
    specs = load_weight_specs()
    copy = tmp_path / "weights"
    shutil.copytree(swap_weights, copy)
    (copy / specs[INSWAPPER].path).write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="inswapper_128: .* is not a readable ONNX model"):
        FaceSwapStage(str(copy), str(bank_path), device="cpu")
    (copy / specs[SCRFD].path).unlink()
    with pytest.raises(MissingWeights, match="scrfd_10g: missing"):
        FaceSwapStage(str(copy), str(bank_path), device="cpu")
    # A readable ONNX file of the wrong kind is refused by what insightface routes it to.
    shutil.copy(swap_weights / specs[SCRFD].path, copy / specs[SCRFD].path)
    shutil.copy(swap_weights / specs[ARCFACE].path, copy / specs[INSWAPPER].path)
    with pytest.raises(ValueError, match="not an inswapper graph: insightface routes it to ArcFaceONNX"):
        FaceSwapStage(str(copy), str(bank_path), device="cpu")


def test_bad_options_are_named(swap_weights, bank_path, tmp_path):
    with pytest.raises(ValueError, match="frame_batch"):
        FaceSwapStage(str(swap_weights), str(bank_path), frame_batch=0)
    with pytest.raises(ValueError, match="det_size"):
        FaceSwapStage(str(swap_weights), str(bank_path), det_size=100)
    with pytest.raises(ValueError, match="device"):
        FaceSwapStage(str(swap_weights), str(bank_path), device="tpu")
    with pytest.raises(FileNotFoundError, match="identity bank"):
        FaceSwapStage(str(swap_weights), str(tmp_path / "none.parquet"), device="cpu")
    assert set(FaceSwapStage.weights_needed({})) == {SCRFD, ARCFACE, INSWAPPER}
