"""AKD under FOMM's convention: face-alignment's 2D-FAN (68 points) on frames resized to 256², scored as
the mean absolute error per coordinate in pixels at 256² (AliaksandrSiarohin/pose-evaluation: extract.py
with `--image_shape 256,256`, then the mean over frames of mean |kp_gen - kp_gt| over points and x/y).

The FAN weights are the manifest's `fan_2dfan4` (face-alignment's 2DFAN4-11f355bf06.pth.tar, a state dict
of its `FAN` class), read from WEIGHTS_DIR and checked against the manifest's sha256 here; face-alignment
never downloads anything: its `_load_native` is replaced by ours and its detector is the no-op `folder`
one, because the face boxes come from the evaluation's own face backend (SCRFD or dlib's HOG detector).
The tiny profile writes a FAN with one hourglass and random weights in the same format, marked tiny.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.frames import resize_frames
from pipeline.weights import check_weights, file_id, load_weight_specs, register_tiny_writer

log = logging.getLogger(__name__)

FAN_2D = "fan_2dfan4"  # configs/weights.yaml
FOMM_SIZE = 256  # FOMM scores keypoints on 256² frames
EUCLID_SIZE = 512  # akd_euclid_512: our Euclidean variant, landmarks mapped to 512²
POINTS = 68
TINY_MARK = "megactor_profile"  # state_dict._metadata[""][TINY_MARK] == "tiny" on the tiny profile's file
_HOURGLASS = re.compile(r"^m(\d+)\.")
JIT_CACHE = Path(os.environ.get("MEGACTOR_CACHE", Path.home() / ".cache" / "megactor")) / "numba"


def fomm_akd(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per frame, FOMM's AKD: mean over points and both coordinates of |pred - target|, (T, K, 2) each in
    pixels at 256². A pure horizontal shift of s px scores s / 2."""
    return np.abs(pred - target).mean(axis=(1, 2)).astype(np.float32)


def rescale_points(points: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Landmarks (..., 2) in pixels of a height x width frame -> pixels of that frame resized to size²."""
    return (points * np.array([size / width, size / height], np.float32)).astype(np.float32)


def cache_decoding_jit(cache_dir: Path = JIT_CACHE) -> None:
    """face-alignment's heatmap decoding (`_get_preds_fromhm`, `transform_np`) is numba code compiled in
    every process on first use (tens of seconds on a busy CPU); keep the compiled code on disk instead
    (under NUMBA_CACHE_DIR when the user set it)."""
    import numba
    from face_alignment import utils

    if not numba.config.CACHE_DIR:
        numba.config.CACHE_DIR = str(cache_dir)
    try:
        for function in (utils.transform_np, utils._get_preds_fromhm):
            function.enable_caching()
    except (RuntimeError, OSError) as exc:  # an unwritable cache folder only costs the compile
        log.warning("face-alignment's decoding compiles without a cache: %s", exc)


class FanLandmarks:
    """face-alignment's FaceAlignment (2D, no flip, as FOMM's extract.py) around a FAN we loaded, fed our
    own face boxes."""

    def __init__(self, net: torch.nn.Module, device: torch.device | str, weights_id: str) -> None:
        from face_alignment import FaceAlignment, LandmarksType

        cache_decoding_jit()

        class _LocalFan(FaceAlignment):
            def _load_native(self, network_name, network_size, device, dtype):  # noqa: ANN001, ANN202
                return net.to(device, dtype=dtype).eval()  # the verified file, never a download

        # `folder` builds no detector network (the boxes are ours); compile off: no warm-up, no cache dir.
        self.aligner = _LocalFan(
            LandmarksType.TWO_D, device=str(device), flip_input=False, face_detector="folder", compile=False
        )
        self.weights_id = weights_id

    def frame_points(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """68 points (pixels of `frame`) for the face in box (x0, y0, x1, y1)."""
        found = self.aligner.get_landmarks_from_image(frame, detected_faces=[np.asarray(box, np.float64)])
        return np.asarray(found[0], np.float32)[:, :2]

    def points_at_256(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(T, 68, 2) points in pixels at 256²: frames resized to 256² (as FOMM scores them), boxes (T, 4)
        in the original frames' pixels scaled with them; NaN where the box is NaN (no face)."""
        height, width = frames.shape[1:3]
        small = resize_frames(frames, FOMM_SIZE, FOMM_SIZE)
        scale = np.array([FOMM_SIZE / width, FOMM_SIZE / height] * 2, np.float64)
        out = np.full((len(frames), POINTS, 2), np.nan, np.float32)
        for t, (frame, box) in enumerate(zip(small, boxes, strict=True)):
            if np.isfinite(box).all():
                out[t] = self.frame_points(np.ascontiguousarray(frame), box.astype(np.float64) * scale)
        return out


def fan_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / load_weight_specs()[FAN_2D].path


def _is_tiny(state: Any) -> bool:
    return getattr(state, "_metadata", {}).get("", {}).get(TINY_MARK) == "tiny"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{FAN_2D}: {path} does not hold a state dict of tensors")
    return state


def load_fan(weights_dir: str | Path, device: torch.device | str = "cpu") -> FanLandmarks:
    """The FAN file from WEIGHTS_DIR: the published file (sha256 as in the manifest) or the tiny profile's.
    MissingWeights when absent; ValueError naming both hashes when it is neither."""
    from face_alignment.models import FAN

    path = fan_path(weights_dir)
    missing = check_weights(Path(weights_dir), [FAN_2D], verify_hash=False)
    if missing:
        from pipeline.weights import MissingWeights

        raise MissingWeights("; ".join(missing))
    wrong = check_weights(Path(weights_dir), [FAN_2D], verify_hash=True)
    state = _read_state(path)
    if wrong and not _is_tiny(state):
        raise ValueError(
            f"{wrong[0]}: not face-alignment's published 2DFAN4 weights; delete it and run "
            f"`python -m pipeline weights fetch --for {FAN_2D}` (or write the tiny profile for tests)"
        )
    hourglasses = {int(m.group(1)) for key in state if (m := _HOURGLASS.match(key))}
    if not hourglasses:
        raise ValueError(f"{FAN_2D}: {path} has no hourglass modules (m0.*): not a FAN state dict")
    net = FAN(max(hourglasses) + 1)
    net.load_state_dict(state)  # strict: a file of another network fails here, naming the keys
    return FanLandmarks(net, device, "tiny" if wrong else file_id(path))


@register_tiny_writer(FAN_2D)
def write_tiny_fan(dest: Path, seed: int) -> None:
    """face-alignment's FAN with one hourglass (the real file has four) and random weights: 68 heatmaps
    at 64² from a 256² crop, saved as the real file is (a state dict), marked tiny."""
    from face_alignment.models import FAN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        state = FAN(1).state_dict()
    state._metadata[""][TINY_MARK] = "tiny"  # type: ignore[attr-defined]
    torch.save(state, dest)
