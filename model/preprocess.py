"""Turn images and videos (uint8 RGB) into the model's pixel tensors, the way training prepares them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.video import centre_square_box, crop_and_resize, read_video_frames

FACE_MASK_METHODS = ("none", "facexlib")
MASK_CHUNK = 8  # driving frames per face-parsing call
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")


def square_resize(frames: np.ndarray, resolution: int) -> np.ndarray:
    """Centre square crop and resize: uint8 (T, H, W, 3) -> (T, R, R, 3)."""
    _, height, width, _ = frames.shape
    return crop_and_resize(frames, centre_square_box(width, height), resolution)


def to_model_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """float (T, 3, H, W) in [-1, 1] -> uint8 (T, H, W, 3): the inverse of to_model_pixels."""
    pixels = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())


def grayscale3(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> the BT.601 luma copied into 3 channels (the DrivenEncoder's input)."""
    luma = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames])
    return np.repeat(luma[..., None], 3, axis=-1)


def mask_faces(
    frames: np.ndarray,
    method: str,
    weights_dir: str | Path | None = None,
    model: str = "parsenet",
    device: str = "cpu",
    input_size: int = 512,
) -> np.ndarray:
    """Black out every non-face pixel of the driving frames (training sees face-masked driving video).

    "none" leaves the frames as they are (for driving videos that are already face crops on black).
    "facexlib" runs the shard builder's own face-mask stage (facexlib parsing, the same labels), with
    its weights read from `weights_dir` laid out as configs/weights.yaml says.
    """
    if method == "none":
        return frames
    if method != "facexlib":
        raise ValueError(f"face_mask: expected one of {FACE_MASK_METHODS}, got {method!r}")
    if weights_dir is None:
        raise ValueError("face_mask=facexlib needs the face-parsing weights folder (face_weights=DIR)")
    from pipeline.stages.face_mask import FaceMaskStage  # torch-heavy; only when asked for

    stage = FaceMaskStage(str(weights_dir), model=model, device=device, input_size=input_size)
    masked = np.empty_like(frames)
    # In chunks with a progress bar: face parsing at 512 px takes seconds per frame on a CPU.
    for start in tqdm(range(0, len(frames), MASK_CHUNK), desc="face masks", unit="chunk"):
        chunk = frames[start : start + MASK_CHUNK]
        mask = stage.process({"frames": chunk, "face_boxes": ""})["face_mask"]  # (t, R, R) bool
        masked[start : start + len(chunk)] = np.where(mask[..., None], chunk, 0)
    return masked


def prepare_driving(
    frames: np.ndarray,
    resolution: int,
    face_mask: str = "none",
    face_weights: str | Path | None = None,
    face_model: str = "parsenet",
    device: str = "cpu",
    parsing_size: int = 512,
) -> torch.Tensor:
    """Driving video uint8 (T, H, W, 3) -> (T, 3, R, R) in [-1, 1]: square, face-masked, grayscale."""
    square = square_resize(frames, resolution)
    masked = mask_faces(square, face_mask, face_weights, face_model, device, parsing_size)
    return to_model_pixels(grayscale3(masked))


def foreground_background_mask(
    reference: np.ndarray,
    weights_dir: str | Path | None,
    backend: str = "auto",
    parsing_model: str = "parsenet",
    device: str = "cpu",
    input_size: int = 512,
) -> torch.Tensor:
    """uint8 (R, R, 3) square reference -> background mask (1, R, R), 1 = background.

    Runs the shard builder's own foreground stage (DensePose where detectron2 is installed, else the
    non-background face-parsing labels), so CLIP sees the same blacked-out person it saw in training.
    """
    if weights_dir is None:
        raise ValueError("ref_mask=foreground needs the annotator weights folder (face_weights=DIR)")
    from pipeline.stages.foreground import ForegroundStage  # torch-heavy; only when asked for

    stage = ForegroundStage(
        str(weights_dir), backend=backend, parsing_model=parsing_model, input_size=input_size, device=device
    )
    person = stage.process({"frames": reference[None]})["fg_mask"][0]  # (R, R) bool
    return torch.from_numpy(~person).float()[None]


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); a video file gives its first frame (the reference frame
    evaluation protocols use)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return read_video_frames(path, 0, 1)[0]
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image (give a .png / .jpg, or a video for its first frame)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def prepare_reference(image: np.ndarray, resolution: int) -> torch.Tensor:
    """Reference image uint8 (H, W, 3) -> (3, R, R) in [-1, 1]."""
    return to_model_pixels(square_resize(image[None], resolution))[0]


def prepare_background_mask(foreground: np.ndarray, resolution: int) -> torch.Tensor:
    """A foreground mask image (H, W, 3) uint8, white = person -> background mask (1, R, R), 1 = background."""
    person = square_resize(foreground[None], resolution)[0, ..., 0] >= 128
    return torch.from_numpy(~person).float()[None]
