"""Frame resizing and the driving-video augmentations of the paper: face mask, grayscale, size and aspect.

Everything works on uint8 arrays, (T, H, W, 3) frames and (T, H, W) bool masks, before the pixels become
model tensors; the jitter is one random transform per sample, the same for all its frames.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from model.preprocess import grayscale3, to_model_pixels

# to_model_pixels of every byte value: a table lookup gives the same floats at a third of the cost.
_PIXEL_OF_BYTE = to_model_pixels(np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1), 3, -1))[
    0, 0, 0
]
_PIXEL_OF_BYTE = _PIXEL_OF_BYTE.numpy().copy()


@dataclass(frozen=True)
class Jitter:
    """One sample's driving transform: the face is drawn at scale x (width aspect, height 1) of the frame."""

    scale: float = 1.0
    aspect: float = 1.0  # width / height factor


def draw_jitter(rng: random.Random, scale_range: Sequence[float], aspect_range: Sequence[float]) -> Jitter:
    """Scale and aspect uniform over their ranges (a range [1, 1] turns that jitter off)."""
    return Jitter(scale=rng.uniform(*scale_range), aspect=rng.uniform(*aspect_range))


def _interpolation(source: float, target: float) -> int:
    """Area averaging only where a frame shrinks to under half its size (aliasing); linear otherwise,
    which is 4-5x cheaper for the mild resizes of the jitter."""
    return cv2.INTER_AREA if 2 * target < source else cv2.INTER_LINEAR


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, C) -> (T, size, size, C); the frames themselves when already that size."""
    _, height, width, _ = frames.shape
    if height == size and width == size:
        return frames
    interpolation = _interpolation(max(height, width), size)
    return np.stack([cv2.resize(f, (size, size), interpolation=interpolation) for f in frames])


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """bool (T, H, W) -> (T, size, size), nearest neighbour (a mask stays a mask)."""
    _, height, width = masks.shape
    if height == size and width == size:
        return masks
    resized = [cv2.resize(m.view(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in masks]
    return np.stack(resized).astype(bool)


def model_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1], contiguous.

    The values of model.preprocess.to_model_pixels (what inference feeds the model), looked up per byte
    instead of computed in three float passes: at 512² this was the loader's largest cost.
    """
    planar = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    return torch.from_numpy(_PIXEL_OF_BYTE[planar])


def black_outside(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) with every pixel outside the bool (T, H, W) mask set to black."""
    if mask.shape != frames.shape[:3]:
        raise ValueError(f"mask {mask.shape} does not match frames {frames.shape[:3]}")
    return np.stack([cv2.bitwise_and(f, f, mask=m.view(np.uint8)) for f, m in zip(frames, mask, strict=True)])


def jitter_frames(frames: np.ndarray, resolution: int, jitter: Jitter) -> np.ndarray:
    """Resize (T, H, W, C) to resolution x scale (width also x aspect), centred on a black resolution² canvas.

    A side longer than the canvas is centre-cropped. Jitter(1, 1) is a plain resize to resolution².
    """
    count, height, width, channels = frames.shape
    out_h = max(1, round(resolution * jitter.scale))
    out_w = max(1, round(resolution * jitter.scale * jitter.aspect))
    if (out_h, out_w) == (resolution, resolution):
        return resize_frames(frames, resolution)
    # Per axis: where the resized frame lands on the canvas and which part of it is kept.
    (dst_y, src_y, keep_h), (dst_x, src_x, keep_w) = (
        ((resolution - n) // 2, 0, n) if n <= resolution else (0, (n - resolution) // 2, resolution)
        for n in (out_h, out_w)
    )
    interpolation = _interpolation(max(height, width), max(out_h, out_w))
    canvas = np.zeros((count, resolution, resolution, channels), np.uint8)
    for i, frame in enumerate(frames):
        resized = cv2.resize(frame, (out_w, out_h), interpolation=interpolation).reshape(
            out_h, out_w, channels
        )
        canvas[i, dst_y : dst_y + keep_h, dst_x : dst_x + keep_w] = resized[
            src_y : src_y + keep_h, src_x : src_x + keep_w
        ]
    return canvas


def prepare_driving_frames(
    frames: np.ndarray, face_mask: np.ndarray, resolution: int, jitter: Jitter
) -> np.ndarray:
    """Driving frames as the DrivenEncoder sees them in training: uint8 (T, R, R, 3).

    Non-face pixels black (the face mask of the same frames), grayscale copied to 3 channels, then the
    sample's size and aspect jitter (which also brings the frames to resolution²).
    """
    return jitter_frames(grayscale3(black_outside(frames, face_mask)), resolution, jitter)
