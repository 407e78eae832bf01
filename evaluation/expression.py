"""AED and APD as jieun-b/portrait-eval-pipeline computes them (scripts/eval/self.py and cross.py), from
MediaPipe FaceLandmarker's 52 blendshape scores and its facial transformation matrix:

- AED, per frame: mean over the 52 blendshapes (`_neutral` included, as the landmarker returns them) of
  |score(generated) - score(driving)|; scores lie in [0, 1].
- APD, per frame: each 4x4 matrix's 3x3 block with every column divided by its norm (the landmarker's
  fit carries a scale); APD is the mean over the 9 entries of |R(generated) - R(driving)|. No angles:
  the unit is a rotation-matrix entry, neither degrees nor radians. A rotation by a small angle t
  about one axis changes four entries and scores (2 sin t + 2 (1 - cos t)) / 9, about 0.22 t.

Frames are analysed at 256x256 (the pipeline's image_shape), one face, IMAGE mode. The pipeline hands
MediaPipe BGR bytes labelled SRGB; we pass RGB, as MediaPipe documents. The landmarker file comes from
WEIGHTS_DIR (configs/weights.yaml `mediapipe_face_landmarker`, verified by its pinned sha256); the
`mediapipe` package is the optional extra `eval-mediapipe`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.frames import check_frames, resize_frames
from pipeline.weights import MissingWeights, check_weights, file_id, load_weight_specs

log = logging.getLogger(__name__)

LANDMARKER = "mediapipe_face_landmarker"  # configs/weights.yaml
BLENDSHAPES = 52
INPUT_SIZE = 256
INSTALL = "pip install '.[eval-mediapipe]'"
FETCH = "make weights FOR=eval"


@dataclass
class Coefficients:
    """One video's MediaPipe outputs; rows are NaN where no face was found."""

    blendshapes: np.ndarray  # (T, 52) scores in [0, 1]
    transforms: np.ndarray  # (T, 4, 4) facial transformation matrices

    @property
    def found(self) -> np.ndarray:
        return np.isfinite(self.blendshapes).all(axis=1)


def blendshape_distance(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """AED per frame: mean |Δ| over the blendshape scores, (T, 52) each; NaN where either has no face."""
    return np.abs(pred.astype(np.float64) - target.astype(np.float64)).mean(axis=1).astype(np.float32)


def rotations(transforms: np.ndarray) -> np.ndarray:
    """(T, 4, 4) -> (T, 3, 3): the upper-left block, each column divided by its norm (removes the scale)."""
    block = transforms[:, :3, :3].astype(np.float64)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def rotation_distance(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """APD per frame: mean |Δ| over the 9 entries of the two column-normalised rotations (T, 4, 4) each."""
    diff = np.abs(rotations(pred) - rotations(target))
    return diff.reshape(len(diff), 9).mean(axis=1).astype(np.float32)


def result_coefficients(result: Any) -> tuple[np.ndarray, np.ndarray]:
    """A FaceLandmarkerResult -> (52 blendshape scores, 4x4 matrix) of its first face; NaN when the result
    has no face (or no blendshapes / matrix: the landmarker was created without asking for them)."""
    scores = np.full(BLENDSHAPES, np.nan)
    matrix = np.full((4, 4), np.nan)
    if result.face_blendshapes and result.facial_transformation_matrixes:
        categories = result.face_blendshapes[0]
        if len(categories) != BLENDSHAPES:
            raise ValueError(f"expected {BLENDSHAPES} blendshapes from the landmarker, got {len(categories)}")
        scores = np.array([c.score for c in categories], np.float64)
        matrix = np.asarray(result.facial_transformation_matrixes[0], np.float64).reshape(4, 4)
    return scores, matrix


def import_mediapipe() -> Any:
    """The mediapipe module, or an ImportError that says how to get AED / APD."""
    try:
        import mediapipe
    except ImportError as exc:
        raise ImportError(
            f"AED / APD need MediaPipe FaceLandmarker: `{INSTALL}` installs the package and `{FETCH}` "
            f"fetches its model ({LANDMARKER}) into WEIGHTS_DIR ({exc})"
        ) from exc
    return mediapipe


def landmarker_file(weights_dir: str | Path | None, manifest: Path | None = None) -> Path:
    """The landmarker's .task file under weights_dir, present and with the manifest's sha256 (there is
    no tiny stand-in: a file that is not the pinned one would give numbers no table can be set beside)."""
    if weights_dir is None:
        raise MissingWeights(f"{LANDMARKER} is read from WEIGHTS_DIR: pass --weights-dir (`{FETCH}`)")
    problems = check_weights(Path(weights_dir), [LANDMARKER], verify_hash=True, manifest=manifest)
    if problems:
        raise MissingWeights("; ".join(problems) + f" (`{FETCH}` downloads and verifies it)")
    return Path(weights_dir) / load_weight_specs(manifest)[LANDMARKER].path


@dataclass
class MediaPipeExpression:
    """MediaPipe FaceLandmarker (IMAGE mode, one face, blendshapes and matrices on) over video frames."""

    landmarker: Any
    mediapipe: Any
    weights: dict[str, str] = field(default_factory=dict)

    def analyse(self, frames: np.ndarray) -> Coefficients:
        """frames: [T,H,W,3] uint8 RGB -> their coefficients, analysed at INPUT_SIZE²."""
        frames = resize_frames(check_frames(frames, "frames"), INPUT_SIZE, INPUT_SIZE)
        scores, matrices = [], []
        for frame in frames:
            data = np.ascontiguousarray(frame)  # MediaPipe reads the buffer as packed rows
            image = self.mediapipe.Image(image_format=self.mediapipe.ImageFormat.SRGB, data=data)
            row, matrix = result_coefficients(self.landmarker.detect(image))
            scores.append(row)
            matrices.append(matrix)
        return Coefficients(np.stack(scores), np.stack(matrices))


def load_landmarker(weights_dir: str | Path | None, manifest: Path | None = None) -> MediaPipeExpression:
    """The package first (its absence is the likelier problem), then the verified file, then the model."""
    mediapipe = import_mediapipe()
    path = landmarker_file(weights_dir, manifest)
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(path)),
        output_face_blendshapes=True,
        output_facial_transformation_matrixes=True,
        num_faces=1,
    )
    try:
        landmarker = vision.FaceLandmarker.create_from_options(options)
    except RuntimeError as exc:
        raise RuntimeError(f"MediaPipe cannot load {path}: {exc}") from exc
    return MediaPipeExpression(landmarker, mediapipe, {LANDMARKER: file_id(path)})
