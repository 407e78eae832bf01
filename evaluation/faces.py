"""Face analysis backends for the identity and motion metrics: per frame, the face box, an identity
embedding, landmarks and head pose.

- insightface (the shard builder's models, buffalo_l): SCRFD box, ArcFace w600k_r50 embedding (512-D),
  2d106det landmarks (106 points, for AKD), 1k3d68 3D landmarks (68 points, for AED) and its pose.
- dlib (pretrained models from `dlib-bin` + `face-recognition-models`, CC0): HOG detector, 68-point
  shape predictor, the 128-D ResNet face descriptor, and pose from the 68 points by cv2.solvePnP on a
  generic 3D face.

Frames without a face get NaN rows and found=False; the metrics average over frames where both videos
have a face and report how many those were.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

BACKENDS = ("insightface", "dlib")
LANDMARK_2D106, LANDMARK_3D68 = "landmark_2d106", "landmark_1k3d68"


@dataclass
class FaceFrames:
    """Per-frame face analysis of one video (T frames)."""

    found: np.ndarray  # (T,) bool
    boxes: np.ndarray  # (T, 4) x0, y0, x1, y1
    embeddings: np.ndarray  # (T, D) unit length
    landmarks: np.ndarray  # (T, K, 2) image pixels, for AKD
    shape: np.ndarray  # (T, K', 2 or 3) landmarks for AED (3D where the backend has them)
    pose: np.ndarray  # (T, 3) pitch, yaw, roll in degrees

    @classmethod
    def empty(cls, count: int, dim: int, points: int, shape_points: int, shape_dims: int) -> FaceFrames:
        nan = np.float32(np.nan)
        return cls(
            np.zeros(count, bool),
            np.full((count, 4), nan, np.float32),
            np.full((count, dim), nan, np.float32),
            np.full((count, points, 2), nan, np.float32),
            np.full((count, shape_points, shape_dims), nan, np.float32),
            np.full((count, 3), nan, np.float32),
        )


class FaceBackend(Protocol):
    name: str
    weights: dict[str, str]  # weights name -> id, recorded in metrics.json

    def analyse(self, frames: np.ndarray) -> FaceFrames: ...


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# dlib


def dlib_model_files() -> dict[str, Path]:
    """The face-recognition-models files (found without importing the package: it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the dlib backend needs the face-recognition-models package (pip install)")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = {
        "shape_68": models / "shape_predictor_68_face_landmarks.dat",
        "descriptor": models / "dlib_face_recognition_resnet_model_v1.dat",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"face-recognition-models is missing {missing}")
    return files


# A generic head in camera axes (x right, y down, z away from the camera), millimetre-ish units: the
# usual six-point model (nose tip, chin, outer eye corners, mouth corners), dlib 68-point indices.
GENERIC_HEAD = np.array(
    [[0.0, 0.0, 0.0], [0.0, 330.0, 65.0], [-225.0, -170.0, 135.0], [225.0, -170.0, 135.0],
     [-150.0, 150.0, 125.0], [150.0, 150.0, 125.0]],
    np.float64,
)  # fmt: skip
GENERIC_HEAD_INDICES = [30, 8, 36, 45, 48, 54]


def pose_from_landmarks(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(pitch, yaw, roll) in degrees of the 68 landmarks' head, from cv2.solvePnP on the generic head
    with a pinhole camera of focal length = image width (no distortion). A frontal face is ~(0, 0, 0);
    roll is the in-plane rotation (positive = clockwise in the image)."""
    camera = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], np.float64)
    image_points = points[GENERIC_HEAD_INDICES].astype(np.float64)
    ok, rvec, _ = cv2.solvePnP(GENERIC_HEAD, image_points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return np.full(3, np.nan, np.float32)
    rotation, _ = cv2.Rodrigues(rvec)
    angles, *_ = cv2.RQDecomp3x3(rotation)
    return np.asarray(angles, np.float32)


class DlibBackend:
    name = "dlib"

    def __init__(self, upsample: int = 1) -> None:
        import dlib

        files = dlib_model_files()
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(files["shape_68"]))
        self.encoder = dlib.face_recognition_model_v1(str(files["descriptor"]))
        self.upsample = upsample
        self.weights = {f"dlib_{key}": path.name for key, path in files.items()}
        self._dlib = dlib

    def analyse(self, frames: np.ndarray) -> FaceFrames:
        out = FaceFrames.empty(len(frames), 128, 68, 68, 2)
        for t, frame in enumerate(frames):
            image = np.ascontiguousarray(frame)
            detections = self.detector(image, self.upsample)
            if not detections:
                continue
            box = max(detections, key=lambda r: r.width() * r.height())  # the main face
            shape = self.shape_predictor(image, box)
            points = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
            descriptor = np.asarray(self.encoder.compute_face_descriptor(image, shape), np.float32)
            out.found[t] = True
            out.boxes[t] = (box.left(), box.top(), box.right(), box.bottom())
            out.embeddings[t] = _unit(descriptor)
            out.landmarks[t] = points
            out.shape[t] = points
            out.pose[t] = pose_from_landmarks(points, image.shape[1], image.shape[0])
        return out


# ---------------------------------------------------------------------------------------------
# insightface


@dataclass
class InsightfaceBackend:
    weights_dir: str | Path
    device: str = "auto"
    det_size: int = 640
    det_thresh: float = 0.5
    name: str = "insightface"
    weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pipeline.faces import (
            ARCFACE,
            SCRFD,
            load_face_analysis,
            onnx_providers,
            weight_paths,
            weights_id,
        )

        names = [SCRFD, ARCFACE, LANDMARK_2D106, LANDMARK_3D68]
        paths = weight_paths(self.weights_dir, names)  # one MissingWeights naming every missing file
        self.weights = {name: weights_id(path) for name, path in paths.items()}
        modules = ["detection", "recognition", "landmark_2d_106", "landmark_3d_68"]
        self.app = load_face_analysis(
            self.weights_dir, modules, onnx_providers(self.device), self.det_size, self.det_thresh
        )

    def analyse(self, frames: np.ndarray) -> FaceFrames:
        out = FaceFrames.empty(len(frames), 512, 106, 68, 3)
        for t, frame in enumerate(frames):
            faces = self.app.get(np.ascontiguousarray(frame[..., ::-1]), max_num=1)  # insightface reads BGR
            if not faces:
                continue
            face = faces[0]
            out.found[t] = True
            out.boxes[t] = face.bbox[:4]
            out.embeddings[t] = _unit(np.asarray(face.embedding, np.float32))
            out.landmarks[t] = face.landmark_2d_106[:, :2]
            out.shape[t] = face.landmark_3d_68
            out.pose[t] = face.pose
        return out


def make_backend(name: str, weights_dir: str | Path | None = None, device: str = "auto") -> FaceBackend:
    if name == "dlib":
        return DlibBackend()
    if name == "insightface":
        if weights_dir is None:
            raise ValueError("the insightface backend reads buffalo_l from WEIGHTS_DIR: pass --weights-dir")
        return InsightfaceBackend(weights_dir, device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
