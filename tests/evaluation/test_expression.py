"""AED / APD under jieun-b/portrait-eval-pipeline's MediaPipe convention (evaluation/expression.py).

The landmarker's model cannot be downloaded here, so the formulas are checked on hand-made blendshape
vectors and transformation matrices, the loader on missing / wrong files, and (where the optional
`mediapipe` package is installed) the conversion of MediaPipe's own result classes."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation import expression
from evaluation.scoring import UNITS, Evaluator
from pipeline.weights import MissingWeights, load_weight_specs

JAW_OPEN = 25  # MediaPipe's blendshape order: _neutral first, jawOpen 26th (Blendshapes.JAW_OPEN)


def transform(rotation: np.ndarray, scale: float = 1.0, shift: tuple[float, float, float] = (0, 0, 0)):
    """A facial transformation matrix as the landmarker fits it: scale * R | t, last row 0 0 0 1."""
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation
    matrix[:3, 3] = shift
    return matrix


def yaw(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])


def roll(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])


def test_aed_is_the_mean_absolute_blendshape_difference() -> None:
    neutral = np.zeros((3, 52))
    moved = neutral.copy()
    moved[0, JAW_OPEN] = 0.52  # mouth opened
    moved[1, [JAW_OPEN, 44, 45]] = [0.26, 0.39, 0.39]  # and a smile (mouthSmileLeft / Right)
    moved[2] = np.nan  # no face in that generated frame
    aed = expression.blendshape_distance(moved, neutral)
    assert aed[0] == pytest.approx(0.01) and aed[1] == pytest.approx(0.02) and np.isnan(aed[2])
    assert (expression.blendshape_distance(neutral, neutral) == 0).all()
    assert expression.blendshape_distance(neutral[:1], moved[:1])[0] == pytest.approx(0.01)  # symmetric


@pytest.mark.parametrize("degrees", [5.0, 10.0, 30.0])
def test_apd_of_a_known_rotation_is_a_matrix_entry_distance_not_an_angle(degrees: float) -> None:
    """A rotation by t about one axis changes four entries: |sin t| twice and 1 - cos t twice, over 9."""
    t = math.radians(degrees)
    expected = (2 * math.sin(t) + 2 * (1 - math.cos(t))) / 9
    front = transform(np.eye(3))
    for turned in (transform(yaw(degrees)), transform(roll(-degrees))):
        apd = expression.rotation_distance(turned[None], front[None])[0]
        assert apd == pytest.approx(expected, rel=1e-6)
        assert apd < t / 2 < degrees  # neither degrees nor radians
    # Scale and translation are not pose: the same rotation, farther and elsewhere, scores 0.
    farther = transform(yaw(degrees), scale=3.2, shift=(4.0, -2.0, -60.0))
    assert expression.rotation_distance(farther[None], transform(yaw(degrees))[None])[0] == pytest.approx(0)


def test_identical_matrices_score_zero_and_a_missing_face_nan() -> None:
    matrices = np.stack([transform(yaw(12) @ roll(7), scale=1.7), np.full((4, 4), np.nan)])
    apd = expression.rotation_distance(matrices, matrices)
    assert apd[0] == 0 and np.isnan(apd[1])


def test_units_say_which_convention_each_motion_metric_follows() -> None:
    assert UNITS["apd_landmark"] == "deg" and "deg" in UNITS["gaze"]
    assert "not deg" in UNITS["apd"] and "rotation-matrix" in UNITS["apd"]
    assert "blendshape" in UNITS["aed"] and "residual" in UNITS["aed_landmark"]


def test_a_missing_landmarker_file_says_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(MissingWeights) as info:
        expression.landmarker_file(tmp_path)
    message = str(info.value)
    assert "make weights FOR=eval" in message and "face_landmarker_v2_with_blendshapes.task" in message
    with pytest.raises(MissingWeights, match="--weights-dir"):
        expression.landmarker_file(None)


def test_a_landmarker_file_with_another_hash_is_refused(tmp_path: Path) -> None:
    path = tmp_path / load_weight_specs()[expression.LANDMARKER].path
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: not the pinned landmarker
    with pytest.raises(MissingWeights, match="wrong sha256"):
        expression.landmarker_file(tmp_path)
    # The same bytes under a manifest that pins them: accepted, so the refusal was the hash.
    manifest = tmp_path / "weights.yaml"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.write_text(
        f"{expression.LANDMARKER}:\n  path: {path.relative_to(tmp_path)}\n  sha256: {digest}\n  origin: here\n"
    )
    assert expression.landmarker_file(tmp_path, manifest) == path


def test_without_mediapipe_the_metrics_are_skipped_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # what `import mediapipe` meets when not installed
    with pytest.raises(ImportError, match=r"pip install '\.\[eval-mediapipe\]'.*make weights FOR=eval"):
        expression.load_landmarker(tmp_path)
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    evaluator = Evaluator(tmp_path, "insightface", "cpu")  # an empty weights folder: nothing else loads
    summary = evaluator.summarise([evaluator.score_clip(frames[::-1].copy(), frames)])
    for name in ("aed", "apd"):
        assert summary["metrics"][name] is None
        assert "eval-mediapipe" in summary["skipped"][name] and "FOR=eval" in summary["skipped"][name]


# --- with the optional package: MediaPipe's own classes ---------------------------------------------


@pytest.fixture(scope="module")
def mediapipe():
    return pytest.importorskip("mediapipe")


def landmarker_result(scores: np.ndarray | None, matrix: np.ndarray | None):
    """A FaceLandmarkerResult built from MediaPipe's classes: one face, or none when scores is None."""
    from mediapipe.tasks.python.components.containers.category import Category
    from mediapipe.tasks.python.vision.face_landmarker import Blendshapes, FaceLandmarkerResult

    if scores is None:
        return FaceLandmarkerResult(face_landmarks=[], face_blendshapes=[], facial_transformation_matrixes=[])
    names = {b.value: b.name for b in Blendshapes}
    categories = [Category(index=i, score=float(s), category_name=names[i]) for i, s in enumerate(scores)]
    return FaceLandmarkerResult(
        face_landmarks=[[]], face_blendshapes=[categories], facial_transformation_matrixes=[matrix]
    )


def test_a_mediapipe_result_becomes_our_coefficients(mediapipe) -> None:
    from mediapipe.tasks.python.vision.face_landmarker import Blendshapes

    assert len(Blendshapes) == expression.BLENDSHAPES and Blendshapes.JAW_OPEN.value == JAW_OPEN
    scores = np.linspace(0, 1, 52)
    matrix = transform(yaw(20), scale=0.9, shift=(1, 2, -40))
    got_scores, got_matrix = expression.result_coefficients(landmarker_result(scores, matrix))
    assert np.allclose(got_scores, scores) and np.allclose(got_matrix, matrix)
    empty_scores, empty_matrix = expression.result_coefficients(landmarker_result(None, None))
    assert np.isnan(empty_scores).all() and empty_scores.shape == (52,) and np.isnan(empty_matrix).all()


class BrightnessLandmarker:
    """Stands in for the landmarker, which cannot run without its model: answers each real mp.Image with
    a real FaceLandmarkerResult whose jawOpen is the image's mean brightness / 255 and whose yaw is 0."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def detect(self, image):
        pixels = image.numpy_view()
        self.sizes.append((image.height, image.width))
        scores = np.zeros(52)
        scores[JAW_OPEN] = pixels.mean() / 255
        return landmarker_result(scores, transform(np.eye(3)))


def test_the_evaluator_scores_aed_and_apd_from_mediapipe_coefficients(mediapipe) -> None:
    landmarker = BrightnessLandmarker()
    evaluator = Evaluator(None, "insightface", "cpu")  # no weights: only the injected landmarker scores
    evaluator._models["expression"] = expression.MediaPipeExpression(landmarker, mediapipe)
    driving = np.full((2, 64, 48, 3), 102, np.uint8)
    pred = driving.copy()
    pred[1] = 153  # brighter: jawOpen 0.6 instead of 0.4
    frames = evaluator.score_clip(pred, driving).frames
    assert landmarker.sizes == [(256, 256)] * 4  # analysed at the pipeline's 256x256
    assert frames["aed"].tolist() == pytest.approx([0, 0.2 / 52], abs=1e-6)
    assert (frames["apd"] == 0).all()


def test_mediapipe_refuses_a_task_file_it_cannot_read(mediapipe, tmp_path: Path) -> None:
    path = tmp_path / "mediapipe" / "broken.task"
    path.parent.mkdir()
    path.write_bytes(b"not a zip archive")
    manifest = tmp_path / "weights.yaml"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.write_text(
        f"{expression.LANDMARKER}:\n  path: mediapipe/broken.task\n  sha256: {digest}\n  origin: here\n"
    )
    with pytest.raises(RuntimeError, match="MediaPipe cannot load .*broken.task"):
        expression.load_landmarker(tmp_path, manifest)
