"""The dlib backend's pretrained models on real photos and a real talking-head clip."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from evaluation import face_metrics
from evaluation.frames import read_frames


def embedding(backend, path: Path) -> np.ndarray:
    faces = backend.analyse(read_frames(path))
    assert faces.found[0], f"no face in {path.name}"
    return faces.embeddings[0]


def test_same_person_scores_higher_than_different_people(photos: Path, dlib_backend) -> None:
    obama = embedding(dlib_backend, photos / "obama.jpg")
    same = [
        float(face_metrics.cosine_to(embedding(dlib_backend, photos / n)[None], obama)[0])
        for n in ("obama2.jpg", "obama3.jpg")
    ]
    other = float(face_metrics.cosine_to(embedding(dlib_backend, photos / "biden.jpg")[None], obama)[0])
    assert min(same) > other, (same, other)


def shifted(frames: np.ndarray, dx: float) -> np.ndarray:
    matrix = np.float32([[1, 0, dx], [0, 1, 0]])
    return np.stack(
        [cv2.warpAffine(f, matrix, f.shape[1::-1], borderMode=cv2.BORDER_REPLICATE) for f in frames]
    )


def test_akd_is_zero_on_itself_and_grows_with_a_shift(carphone: np.ndarray, dlib_backend) -> None:
    base = dlib_backend.analyse(carphone)
    assert base.found.all()
    assert np.all(face_metrics.keypoint_distance(base.landmarks, base.landmarks) == 0)
    akd = []
    for dx in (2, 6, 12):
        moved = dlib_backend.analyse(shifted(carphone, dx))
        akd.append(face_metrics.summarise(face_metrics.keypoint_distance(moved.landmarks, base.landmarks))[0])
    assert akd[0] < akd[1] < akd[2], akd
    assert abs(akd[2] - 12) < 4, akd  # landmarks follow the face: about the shift itself


def rotated(image: np.ndarray, degrees: float, centre: tuple[float, float]) -> np.ndarray:
    matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
    return cv2.warpAffine(image, matrix, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)


def test_apd_follows_an_in_plane_rotation(photos: Path, dlib_backend) -> None:
    image = read_frames(photos / "obama.jpg")[0]
    image = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    base = dlib_backend.analyse(image[None])
    assert base.found[0]
    x0, y0, x1, y1 = base.boxes[0]
    centre = (float(x0 + x1) / 2, float(y0 + y1) / 2)
    roll_errors, apd = [], []
    for angle in (5, 10, 20):
        turned = dlib_backend.analyse(rotated(image, angle, centre)[None])
        assert turned.found[0], angle
        roll_errors.append(abs(float(turned.pose[0, 2] - base.pose[0, 2])))
        apd.append(float(face_metrics.pose_distance(turned.pose, base.pose)[0]))
    assert np.allclose(roll_errors, [5, 10, 20], atol=3.0), roll_errors
    assert apd[0] < apd[1] < apd[2], apd
