"""Decode one clip segment, crop it square around the face and resize it (a CPU task per row)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pipeline.rows import Row
from pipeline.video import (
    centre_square_box,
    crop_and_resize,
    read_image_frames,
    read_video_frames,
    square_crop_box,
)


def decode_segment(row: Row, resolution: int, crop_scale: float, threads: int = 0) -> Row:
    """Add `frames` (uint8 [T,R,R,3]) and `crop_box` (x0, y0, x1, y1 in source pixels) to a manifest
    row, and move its `face_boxes` (JSON, per frame) into output pixels; "" when the dataset has none.

    threads: decoder and OpenCV threads; 1 inside Ray tasks, which already run one per CPU."""
    if threads:
        cv2.setNumThreads(threads)
    start, stop = int(row["frame_start"]), int(row["frame_stop"])
    source = Path(str(row["source"]))
    if row["source_kind"] == "video":
        frames = read_video_frames(source, start, stop, threads)
    else:
        frames = read_image_frames(source, start, stop)
    _, height, width, _ = frames.shape
    boxes_json = str(row["face_boxes"])
    boxes = np.asarray(json.loads(boxes_json), np.float64) if boxes_json else None
    if boxes is not None and (width, height) == (int(row["width"]), int(row["height"])):
        box = square_crop_box(boxes, width, height, crop_scale)
        x0, y0, x1, _ = box
        scale = resolution / (x1 - x0)
        row["face_boxes"] = json.dumps(np.round((boxes - [x0, y0, x0, y0]) * scale, 2).tolist())
    else:
        box = centre_square_box(width, height)
        row["face_boxes"] = ""
    row["frames"] = crop_and_resize(frames, box, resolution)
    row["crop_box"] = json.dumps([int(v) for v in box])
    row["num_frames"] = len(frames)
    return row
