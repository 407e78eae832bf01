"""Frames in, frames out: reading videos and images as uint8 RGB and the tensor forms the networks take."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.video import read_video_frames

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def check_frames(frames: np.ndarray, what: str = "frames") -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError(f"{what}: no frames")
    return frames


def read_frames(path: str | Path) -> np.ndarray:
    """A video (any container PyAV decodes) or a single image, as uint8 RGB [T,H,W,3]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        return image[None, ..., ::-1].copy()
    return check_frames(read_video_frames(path), str(path))


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    interpolation = cv2.INTER_AREA if frames.shape[1] > height else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (width, height), interpolation=interpolation) for f in frames])


def to_float(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [T,3,H,W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def warn_aspect(frames: np.ndarray, height: int, width: int, what: str = "frames") -> np.ndarray:
    """frames as they are, with a warning when resizing them to height x width changes their aspect
    ratio (a non-square video squared to a square one stretches its faces: every face metric changes)."""
    source_height, source_width = frames.shape[1:3]
    if abs(source_width / source_height - width / height) > 0.01:
        kind = "squared" if height == width else "stretched"
        log.warning(
            "%s is %dx%d, %s to %dx%d to be scored: its faces are distorted; crop it to %dx%d's aspect ratio first",
            what, source_width, source_height, kind, width, height, width, height,
        )  # fmt: skip
    return frames


def fit_frames(frames: np.ndarray, height: int, width: int, what: str = "frames") -> np.ndarray:
    """frames resized to height x width (see warn_aspect)."""
    return resize_frames(warn_aspect(frames, height, width, what), height, width)
