"""The gaze stage and its L2CS-Net loader on the tiny profile (random weights, released key layout)."""

import json
import math

import numpy as np
import pytest
import torch

from pipeline.rows import rows_to_batch
from pipeline.sources.demo import make_identity, render_clip
from pipeline.stages.gaze import GazeStage
from pipeline.stages.l2cs import L2CS, L2CSWeightsError, decode_gaze360, load_l2cs, write_tiny_l2cs
from pipeline.weights import MissingWeights, ensure_tiny_weights, load_weight_specs

SMALL = {"input_size": 64, "frame_batch": 4}  # fast options for behaviour tests; one test runs the defaults


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    return ensure_tiny_weights(tmp_path_factory.mktemp("gaze_weights"), ["l2cs_gaze360"], seed=0)


@pytest.fixture(scope="session")
def weights_file(weights_dir):
    return weights_dir / load_weight_specs()["l2cs_gaze360"].path


@pytest.fixture(scope="session")
def stage(weights_dir):
    return GazeStage(str(weights_dir), **SMALL)


@pytest.fixture(scope="session")
def clip():
    frames, boxes, _ = render_clip(make_identity(1), 25, (256, 256), 120, 0.5, seed=3)
    return frames, boxes


def make_row(frames, boxes, bucket="real", key="k0"):
    return {
        "key": key,
        "clip_id": key,
        "dataset": "demo",
        "identity": "id",
        "bucket": bucket,
        "frames": frames,
        "face_boxes": "" if boxes is None else json.dumps(np.asarray(boxes).tolist()),
        "extra": "",
        "weights": "",
        "gaze_scores": "",
        "error_stage": "",
        "error": "",
        "message": "",
        "annotations": "[]",
        "timings": "{}",
    }


# --- loader -------------------------------------------------------------------------------------


def test_tiny_file_has_the_released_key_layout(weights_file):
    assert weights_file.name == "L2CSNet_gaze360.pkl"
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    keys = list(state)
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert {k.split(".")[0] for k in keys} == {
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc_yaw_gaze",
        "fc_pitch_gaze",
        "fc_finetune",
    }
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)  # ResNet50: 6 bottlenecks in layer3
    assert state["fc_yaw_gaze.weight"].shape == (90, 2048)
    assert state["fc_pitch_gaze.weight"].shape == (90, 2048)
    assert state["fc_finetune.weight"].shape == (3, 2051)
    assert isinstance(load_l2cs(weights_file), L2CS)


def test_tiny_writer_is_deterministic(tmp_path):
    write_tiny_l2cs(tmp_path / "a.pkl", seed=7)
    write_tiny_l2cs(tmp_path / "b.pkl", seed=7)
    a = torch.load(tmp_path / "a.pkl", weights_only=True)
    b = torch.load(tmp_path / "b.pkl", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatching_state_dict_names_the_keys(tmp_path, weights_file):
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's own classifier: not in L2CS
    del state["fc_finetune.bias"]
    path = tmp_path / "bad.pkl"
    torch.save(state, path)
    with pytest.raises(
        L2CSWeightsError, match=r"missing keys \[fc_finetune\.bias\].*unexpected keys \[fc\.weight\]"
    ):
        load_l2cs(path)
    # the same weights under a `backbone.` prefix are not the released layout either
    prefixed = {
        (k if k.startswith("fc_") else f"backbone.{k}"): v for k, v in state.items() if k != "fc.weight"
    }
    torch.save(prefixed, path)
    with pytest.raises(L2CSWeightsError, match=r"missing keys \[bn1\.bias.*unexpected keys \[backbone\."):
        load_l2cs(path)


def test_wrong_shapes_missing_and_corrupt_files(tmp_path, weights_file):
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    state["fc_yaw_gaze.weight"] = torch.zeros(66, 2048)  # a 66-bin (MPIIGaze) head
    torch.save(state, tmp_path / "shape.pkl")
    with pytest.raises(L2CSWeightsError, match=r"fc_yaw_gaze\.weight: \(66, 2048\) != \(90, 2048\)"):
        load_l2cs(tmp_path / "shape.pkl")
    with pytest.raises(MissingWeights, match="nope.pkl"):
        load_l2cs(tmp_path / "nope.pkl")
    (tmp_path / "corrupt.pkl").write_bytes(weights_file.read_bytes()[:5000])
    with pytest.raises(L2CSWeightsError, match="cannot read L2CS weights .*corrupt.pkl"):
        load_l2cs(tmp_path / "corrupt.pkl")
    with pytest.raises(MissingWeights):
        GazeStage(str(tmp_path / "empty"))


# --- decoding -----------------------------------------------------------------------------------


def test_decode_formula_on_hand_made_logits():
    logits = torch.full((4, 90), -1e4)
    logits[0, 45] = 0.0  # all mass in bin 45: 45*4 - 180 = 0°
    logits[1, 45:47] = 0.0  # bins 45 and 46 equally: 45.5*4 - 180 = 2°
    logits[2] = 0.0  # uniform: mean index 44.5 -> -2°
    logits[3] = torch.linspace(-3, 3, 90)  # a slope: check against the formula in numpy
    got = decode_gaze360(logits).numpy()
    row = np.linspace(-3, 3, 90, dtype=np.float32)
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    expected_deg = [0.0, 2.0, -2.0, float((probs * np.arange(90)).sum() * 4 - 180)]
    np.testing.assert_allclose(got, np.radians(expected_deg), atol=1e-5)


def test_first_head_is_read_as_pitch(tmp_path, weights_file, clip):
    """The released file's `fc_yaw_gaze` is the pitch head: bias it to one bin and see pitch there."""
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    for head, target in (("fc_yaw_gaze", 60), ("fc_pitch_gaze", 30)):
        state[f"{head}.weight"] = torch.zeros(90, 2048)
        state[f"{head}.bias"] = torch.full((90,), -1e4)
        state[f"{head}.bias"][target] = 0.0
    (tmp_path / "l2cs").mkdir()
    torch.save(state, tmp_path / "l2cs" / "L2CSNet_gaze360.pkl")
    frames, boxes = clip
    gaze = GazeStage(str(tmp_path), **SMALL).process(make_row(frames, boxes))["gaze"]
    np.testing.assert_allclose(gaze[0], np.radians([60 * 4 - 180, 30 * 4 - 180]), atol=1e-5)


# --- the stage ----------------------------------------------------------------------------------


def test_stage_outputs_nan_pattern_and_scores(stage, clip):
    frames, boxes = clip
    row = stage.process(make_row(frames, boxes))
    gaze = row["gaze"]
    assert gaze.dtype == np.float32 and gaze.shape == (25, 2)
    computed = np.isfinite(gaze).all(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(computed), [0, 10, 20])
    assert np.isnan(gaze[~computed]).all()
    assert np.all(np.abs(gaze[computed]) <= math.pi)
    scores = json.loads(row["gaze_scores"])
    assert set(scores) == {"authors", "robust_spread_deg", "samples"} and scores["samples"] == 3
    assert np.isfinite(scores["authors"]) and np.isfinite(scores["robust_spread_deg"])
    assert json.loads(row["extra"]) == {"gaze_crop": "face_boxes", "gaze_frames_without_box": 0}
    assert len(json.loads(row["weights"])["l2cs_gaze360"]) == 12


def test_every_and_max_samples(weights_dir, clip):
    frames, boxes = clip
    gaze = GazeStage(str(weights_dir), every=3, max_samples=4, **SMALL).process(make_row(frames, boxes))[
        "gaze"
    ]
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(gaze[:, 0])), [0, 3, 6, 9])


def test_determinism(weights_dir, stage, clip):
    frames, boxes = clip
    first = stage.process(make_row(frames, boxes))
    again = GazeStage(str(weights_dir), **SMALL).process(make_row(frames, boxes))
    np.testing.assert_array_equal(first["gaze"], again["gaze"])
    assert first["gaze_scores"] == again["gaze_scores"]


def test_batching_does_not_change_results(weights_dir, clip):
    frames, boxes = clip
    stage = GazeStage(str(weights_dir), every=4, input_size=64, frame_batch=1)
    one = stage.process(make_row(frames, boxes))
    stage.frame_batch = 5  # 7 crops: one batch of 5 and one of 2
    many = stage.process(make_row(frames, boxes))
    # float32 convolutions pick other kernels per batch size: 1e-4 degrees is rounding, a batching bug is degrees
    np.testing.assert_allclose(one["gaze"], many["gaze"], rtol=1e-5, atol=1e-4, equal_nan=True)


def test_clip_without_boxes_uses_the_centre_crop(stage, clip):
    frames, _ = clip
    row = stage.process(make_row(frames, None))
    assert np.isfinite(row["gaze"][::10]).all()
    assert json.loads(row["extra"])["gaze_crop"] == "centre"


def test_clip_without_a_face(stage, clip):
    """Frames whose box is null or degenerate (no face found upstream) stay NaN; the clip is not failed."""
    frames, _ = clip
    boxes = [None] * 25
    boxes[10] = [50, 50, 50, 90]  # zero width
    row = stage.process(make_row(np.zeros_like(frames), None) | {"face_boxes": json.dumps(boxes)})
    assert np.isnan(row["gaze"]).all()
    scores = json.loads(row["gaze_scores"])
    assert (
        math.isnan(scores["authors"]) and math.isnan(scores["robust_spread_deg"]) and scores["samples"] == 0
    )
    assert json.loads(row["extra"])["gaze_frames_without_box"] == 3


def test_all_buckets_and_a_failure_becomes_a_failure_row(stage, clip):
    frames, boxes = clip
    rows = [make_row(frames, boxes, bucket, key=bucket) for bucket in ("real", "swap", "style")]
    rows.append(make_row(frames, boxes[:5], key="bad"))  # 5 boxes for 25 frames
    out = stage(rows_to_batch(rows))
    assert list(out["error_stage"]) == ["", "", "", "gaze"]
    assert "5 boxes for 25 frames" in out["message"][3]
    for i in range(3):
        assert out["gaze"][i].shape == (25, 2)
        assert json.loads(out["annotations"][i]) == ["gaze"]
    assert len(out["gaze"][3]) == 0 and json.loads(out["annotations"][3]) == []


def test_options_are_checked(weights_dir):
    with pytest.raises(ValueError, match="unknown options \\['evry'\\]"):
        GazeStage(str(weights_dir), evry=5)
    with pytest.raises(ValueError, match="every must be a positive int"):
        GazeStage(str(weights_dir), every=0)
    with pytest.raises(ValueError, match="input_size must be a multiple of 32"):
        GazeStage(str(weights_dir), input_size=100)
    with pytest.raises(ValueError, match="centre_crop"):
        GazeStage(str(weights_dir), centre_crop=1.5)
    assert GazeStage.weights_needed({}) == ["l2cs_gaze360"]


def test_default_options_on_a_real_face(weights_dir):
    """Defaults (448² input, every 10) on the astronaut's face: 2 crops from 12 frames."""
    frames, boxes, _ = render_clip(make_identity(0), 12, (384, 288), 100, 0.3, seed=1)
    frames = frames[:, :, 48:336]  # square frames, boxes moved with them
    boxes = boxes - [48, 0, 48, 0]
    stage = GazeStage(str(weights_dir))
    assert stage.input_size == 448 and stage.every == 10
    gaze = stage.process(make_row(frames, boxes))["gaze"]
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(gaze[:, 0])), [0, 10])
