"""The face-swap stage on the tiny profile: insightface's real loaders on our random-weight ONNX graphs."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import onnx
import pytest
from swap_helpers import decoded_row, make_manifest

from pipeline.identity_bank import build_identity_bank
from pipeline.rows import batch_to_rows, rows_to_batch
from pipeline.stages.face_swap import (
    ARCFACE,
    INSWAPPER,
    SCRFD,
    FaceSwapStage,
    FaceTrackError,
    face_mask_alpha,
    find_face,
    insightface_alpha,
    load_face_analysis,
    paste_face,
    seam_energy,
)
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
        dict(clip_id="g0", identity=0, num_frames=12),  # person00 again: a longer clip for the track tests
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
    extra = json.loads(out["extra"])
    assert extra["swap_frames_without_face"] == 0
    assert extra["swap_frames_on_face_mask"] == 0  # no face_mask stage ran: insightface's mask
    assert -1.0 <= extra["swap_source_cosine"] <= 1.0
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
    assert json.loads(out["extra"])["swap_frames_without_face"] == 0
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


def test_clip_without_a_face_is_a_failure_row(stage, manifest):
    # Written as is, its swap.mp4 would be the target's own face: the leak swap data exists to remove.
    row = rows(manifest)["dark"]
    calls_before = stage.swap_calls
    (out,) = batch_to_rows(stage(rows_to_batch([row])))
    assert out["error_stage"] == "swap" and "no face detected in any of the 4 frames" in out["message"]
    assert stage.swap_calls == calls_before


def test_face_far_from_the_dataset_box_is_not_swapped(stage, manifest):
    row = rows(manifest)["a0"]
    row["face_boxes"] = json.dumps([[0.0, 0.0, 6.0, 6.0]] * len(row["frames"]))  # a box with no face
    with pytest.raises(FaceTrackError, match="no face detected in any of the 5 frames"):
        stage.process(row)


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


def dim(frames, times):
    """A lighting dip: the face is still there, darker than the tiny SCRFD's score needs."""
    frames[times] = (frames[times] * 0.3).astype(np.uint8)


def missed_frames(stage, row):
    boxes = np.asarray(json.loads(row["face_boxes"]))
    bgr = [np.ascontiguousarray(f[..., ::-1]) for f in row["frames"]]
    return [t for t, b in enumerate(bgr) if find_face(stage.detector, b, boxes[t], stage.min_iou) is None]


def test_detection_gaps_are_filled_so_no_frame_keeps_the_original_face(stage, manifest):
    row = rows(manifest)["g0"]
    dim(row["frames"], [5, 6])
    assert missed_frames(stage, row) == [5, 6]
    frames = row["frames"].copy()
    out = stage.process(dict(row))
    assert json.loads(out["extra"])["swap_frames_without_face"] == 2
    driving = out["driving_frames"]
    boxes = np.asarray(json.loads(row["face_boxes"]))
    for t, (x0, y0, x1, y1) in enumerate(boxes.round().astype(int)):
        face_diff = np.abs(driving[t, y0:y1, x0:x1].astype(int) - frames[t, y0:y1, x0:x1]).mean()
        assert face_diff > 2.0, t  # before: frames 5 and 6 were the original pixels (0.0)


def test_clip_missing_its_face_too_often_is_a_failure_row(stage, manifest):
    row = rows(manifest)["g0"]
    dim(row["frames"], [2, 5, 8])  # short gaps, but a quarter of the clip
    assert missed_frames(stage, row) == [2, 5, 8]
    (out,) = batch_to_rows(stage(rows_to_batch([row])))
    assert out["error_stage"] == "swap"
    assert "no face detected in 3 of 12 frames (0.25 > max_missing_fraction=0.2)" in out["message"]


def ellipse_masks(row):
    """Face-parsing-like masks: the face oval inscribed in the dataset box of each frame."""
    frames = row["frames"]
    masks = np.zeros(frames.shape[:3], np.uint8)
    for t, (x0, y0, x1, y1) in enumerate(np.asarray(json.loads(row["face_boxes"]))):
        centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
        cv2.ellipse(masks[t], centre, (round((x1 - x0) / 2), round((y1 - y0) / 2)), 0, 0, 360, 1, -1)
    return masks.astype(bool)


def test_paste_back_follows_the_face_mask(stage, manifest):
    row = rows(manifest)["a0"]
    row["face_mask"] = masks = ellipse_masks(row)
    frames = row["frames"].copy()
    out = stage.process(dict(row))
    driving = out["driving_frames"].astype(int)
    changed = np.abs(driving - frames).max(-1) > 2
    for t, mask in enumerate(masks):
        reach = int(np.ceil(3 * stage.blend_feather * np.sqrt(mask.sum()))) + 2
        near = cv2.dilate(mask.astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)).astype(bool)
        core = cv2.erode(mask.astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)).astype(bool)
        assert not changed[t][~near].any(), t  # before: insightface's square repainted hair and background
        assert np.abs(driving[t] - frames[t])[core].mean() > 2.0, t  # the face itself is swapped
    assert json.loads(out["extra"])["swap_frames_on_face_mask"] == len(frames)
    # The swap's border carries less added edge energy than insightface's square (see the docs).
    fallback = stage.process(rows(manifest)["a0"])["driving_frames"]
    inner = int(np.ceil(3 * stage.blend_feather * np.sqrt(masks[0].sum()))) + 1
    on_mask, square = (seam_energy(x, frames, masks, inner) for x in (out["driving_frames"], fallback))
    assert on_mask < 0.7 * square, (on_mask, square)


def test_without_a_face_mask_the_paste_back_is_insightfaces(stage, manifest):
    from insightface.app.common import Face

    row = rows(manifest)["b0"]
    bgr = np.ascontiguousarray(row["frames"][0][..., ::-1])
    face = find_face(stage.detector, bgr, np.asarray(json.loads(row["face_boxes"]))[0], stage.min_iou)
    source = Face(embedding=next(iter(stage.bank.values())))
    expected = stage.swapper.get(bgr, face, source, paste_back=True)
    fake, matrix = stage.swapper.get(bgr, face, source, paste_back=False)
    assert np.array_equal(paste_face(bgr, fake, matrix, insightface_alpha(matrix, bgr.shape[:2])), expected)
    # An empty parsing mask for a frame falls back to this mask, not to the original pixels.
    assert face_mask_alpha(np.zeros(bgr.shape[:2], bool), matrix, 0.05) is None


def test_source_is_never_too_similar_to_the_clip_identity(stage, swap_weights, bank_path, manifest):
    from pipeline.identity_bank import load_identity_bank, source_cosine

    bank = load_identity_bank(bank_path).set_index("identity")
    own = bank.loc["person00", "normed"]
    cosines = sorted((source_cosine(bank.loc[i, "normed"], own), i) for i in ("person01", "person02"))
    margin = (cosines[0][0] + cosines[1][0]) / 2  # only the less similar one is allowed
    # Without a margin (the tiny profile's default: random ArcFace) the closer one is drawn for a0.
    assert stage.process(rows(manifest)["a0"])["swap_source_identity"] == cosines[1][1]
    strict = FaceSwapStage(str(swap_weights), str(bank_path), max_source_cosine=margin, device="cpu")
    for clip in ("a0", "g0"):
        out = strict.process(rows(manifest)[clip])
        assert out["swap_source_identity"] == cosines[0][1], clip
        assert json.loads(out["extra"])["swap_source_cosine"] < margin
    refuse_all = FaceSwapStage(str(swap_weights), str(bank_path), max_source_cosine=-1.0, device="cpu")
    with pytest.raises(ValueError, match="ArcFace cosine >= max_source_cosine=-1.0"):
        refuse_all.process(rows(manifest)["a0"])
