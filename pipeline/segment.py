"""Decode one clip segment, crop it square around the face and resize it (a CPU task per row)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np

from pipeline.rows import Row, text_field
from pipeline.video import (
    MAX_FRAME_PIXELS,
    ClipError,
    centre_square_box,
    check_frame_size,
    crop_and_resize_frame,
    read_image_frames,
    read_video_frames,
    square_crop_box,
)


def _checked_crop(
    frame: np.ndarray, box: tuple[int, ...], resolution: int, size: tuple[int, int]
) -> np.ndarray:
    height, width = frame.shape[:2]
    if (width, height) != size:
        raise ValueError(f"a frame is {width}x{height}, the clip's frames are {size[0]}x{size[1]}")
    return crop_and_resize_frame(frame, box, resolution)


def segment_crop_box(row: Row, crop_scale: float) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
    """The square crop of a segment in source-frame pixels, and its face boxes (None if none): the
    dataset's fixed crop (raw CelebV-HQ), else a square around the union of the face boxes, else the
    centre square (a clip that is already a face crop)."""
    width, height = int(row["width"]), int(row["height"])
    boxes_json = text_field(row, "face_boxes")
    boxes = np.asarray(json.loads(boxes_json), np.float64) if boxes_json else None
    fixed = text_field(row, "fixed_crop")
    if fixed:
        x0, y0, x1, y1 = (int(v) for v in json.loads(fixed))
        return (x0, y0, x1, y1), boxes
    if boxes is not None:
        return square_crop_box(boxes, width, height, crop_scale), boxes
    return centre_square_box(width, height), None


def decode_segment(
    row: Row,
    resolution: int,
    crop_scale: float,
    threads: int = 0,
    min_face_px: int = 64,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
) -> Row:
    """Add `frames` (uint8 [T,R,R,3]) and `crop_box` (x0, y0, x1, y1 in source pixels) to a manifest
    row, and move its `face_boxes` (JSON, per frame) into output pixels; "" when the dataset has none.

    Each frame is cropped and resized as it is decoded: a task never holds the segment at source size.
    threads: decoder and OpenCV threads; 1 inside Ray tasks, which already run one per CPU.
    min_face_px: a crop with a shorter side is refused (ClipError too_small) instead of upscaled.
    max_frame_pixels: frames declaring more pixels are refused before they are decoded."""
    if threads:
        cv2.setNumThreads(threads)
    start, stop = int(row["frame_start"]), int(row["frame_stop"])
    source = Path(str(row["source"]))
    size = (int(row["width"]), int(row["height"]))
    check_frame_size(size, str(source), None, max_frame_pixels)
    try:
        box, boxes = segment_crop_box(row, crop_scale)
    except ClipError as exc:
        raise ClipError(exc.reason, f"{source}: {exc}") from exc
    side = box[2] - box[0]
    if side < min_face_px:
        raise ClipError(
            "too_small",
            f"{source}: the face crop is {side} px on a {size[0]}x{size[1]} frame, under min_face_px "
            f"{min_face_px}: upscaling it to {resolution} px would make a blurred sample",
        )
    crop = functools.partial(_checked_crop, box=box, resolution=resolution, size=size)
    if row["source_kind"] == "video":
        frames = read_video_frames(source, start, stop, threads, transform=crop, max_pixels=max_frame_pixels)
    else:
        prefix = text_field(row, "member_prefix")
        frames = read_image_frames(
            source, start, stop, prefix, transform=crop, size=size, max_pixels=max_frame_pixels
        )
    if boxes is not None:
        x0, y0, x1, _ = box
        scale = resolution / (x1 - x0)
        row["face_boxes"] = json.dumps(np.round((boxes - [x0, y0, x0, y0]) * scale, 2).tolist())
    else:
        row["face_boxes"] = ""
    row["frames"] = frames
    row["crop_box"] = json.dumps([int(v) for v in box])
    row["num_frames"] = len(frames)
    return row
