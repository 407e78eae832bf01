"""Gaze annotator: L2CS-Net gaze360 on every k-th frame's face crop -> `gaze` [T,2] and clip scores.

Face crops come from the row's `face_boxes` (output pixels, one per frame: VFHQ's meta). A clip
without boxes (CelebV-HQ: already cut and cropped around the face by the dataset's script) gets a
fixed centred square crop of `centre_crop` times the frame side instead of a detector: the clip is a
face crop by construction, a detector would need another weights file and a pass over every sampled
frame, and with the tiny profile's random weights it would find nothing reproducible to test.
A frame whose box is null or degenerate keeps NaN and is counted in `extra`.

Sampling follows the authors' filter: frames 0, k, 2k, ... (k = `every`, 10), at most `max_samples`
(32) of them; the other frames' gaze is NaN. Scores: pipeline/gaze_scores.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.gaze_scores import clip_scores
from pipeline.rows import Row, update_json_field
from pipeline.stages.base import Stage, register_stage
from pipeline.stages.device import limit_torch_memory, resolve_device
from pipeline.stages.l2cs import WEIGHTS_NAME, decode_gaze360, load_l2cs, normalise
from pipeline.video import crop_and_resize
from pipeline.weights import file_id, load_weight_specs

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "every": 10,  # the authors' stride (REFERENCE.md §2)
    "max_samples": 32,  # the authors' cap
    "frame_batch": 16,
    "device": "auto",
    "input_size": 448,  # L2CS's training size; do not lower it for real weights
    "centre_crop": 0.7,  # side of the centred crop for clips without boxes, as a fraction of the frame
    "box_scale": 1.0,  # square side = box_scale x the longer side of a face box
}


def sample_indices(num_frames: int, every: int, max_samples: int) -> np.ndarray:
    """Frames 0, every, 2·every, ... capped at max_samples (the authors' frames[::10][:32])."""
    return np.arange(0, num_frames, every)[:max_samples]


def square_around(box: np.ndarray, scale: float) -> tuple[int, int, int, int] | None:
    """A square (x0, y0, x1, y1) centred on a face box, side = scale x its longer side; None if degenerate."""
    if box is None or not np.all(np.isfinite(box)):
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * scale
    if x1 <= x0 or y1 <= y0 or side < 2:
        return None
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    return left, top, left + round(side), top + round(side)


@register_stage
class GazeStage(Stage):
    """L2CS-Net gaze360 on sampled frames' face crops; all buckets."""

    name: ClassVar[str] = "gaze"
    buckets: ClassVar[tuple[str, ...] | None] = None
    outputs: ClassVar[dict[str, Any]] = {"gaze": np.zeros((0, 2), np.float32)}

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        return [WEIGHTS_NAME]

    def __init__(self, weights_dir: str, gpu_share: float = 0.0, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"gaze stage: unknown options {unknown}; known: {sorted(DEFAULTS)}")
        opts = {**DEFAULTS, **options}
        for key in ("every", "max_samples", "frame_batch", "input_size"):
            if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
                raise ValueError(f"gaze stage: option {key} must be a positive int, got {opts[key]!r}")
        if opts["input_size"] % 32:
            raise ValueError(f"gaze stage: input_size must be a multiple of 32, got {opts['input_size']}")
        if not 0 < float(opts["centre_crop"]) <= 1:
            raise ValueError(f"gaze stage: centre_crop must be in (0, 1], got {opts['centre_crop']!r}")
        if not float(opts["box_scale"]) > 0:
            raise ValueError(f"gaze stage: box_scale must be > 0, got {opts['box_scale']!r}")
        self.every, self.max_samples = opts["every"], opts["max_samples"]
        self.frame_batch, self.input_size = opts["frame_batch"], opts["input_size"]
        self.centre_crop, self.box_scale = float(opts["centre_crop"]), float(opts["box_scale"])
        self.device = resolve_device(str(opts["device"]))
        limit_torch_memory(self.device, gpu_share)
        # Half precision on GPU: ResNet50 inference is well inside fp16's range; softmax runs in fp32.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        path = Path(weights_dir) / load_weight_specs()[WEIGHTS_NAME].path
        self.model = load_l2cs(path, self.device).to(dtype=self.dtype, memory_format=torch.channels_last)
        self.weights_id = file_id(path)

    def crop_boxes(self, row: Row, num_frames: int, size: int) -> tuple[list[tuple[int, ...] | None], str]:
        """One square crop box per frame (None: no face in that frame) and where the boxes came from."""
        boxes_json = str(row.get("face_boxes") or "")
        if not boxes_json:
            side = max(2, round(size * self.centre_crop))
            left = (size - side) // 2
            return [(left, left, left + side, left + side)] * num_frames, "centre"
        boxes = json.loads(boxes_json)
        if len(boxes) != num_frames:
            raise ValueError(f"face_boxes has {len(boxes)} boxes for {num_frames} frames")
        arrays = [None if b is None else np.asarray(b, np.float64).reshape(-1)[:4] for b in boxes]
        return [
            None if b is None or b.size < 4 else square_around(b, self.box_scale) for b in arrays
        ], "face_boxes"

    @torch.inference_mode()
    def predict(self, crops: np.ndarray) -> np.ndarray:
        """uint8 RGB crops (N, S, S, 3) -> float32 (N, 2) pitch, yaw in radians, `frame_batch` at a time."""
        out = []
        for start in range(0, len(crops), self.frame_batch):
            x = normalise(crops[start : start + self.frame_batch], self.device, self.dtype)
            pitch_logits, yaw_logits = self.model(x.contiguous(memory_format=torch.channels_last))
            out.append(torch.stack([decode_gaze360(pitch_logits), decode_gaze360(yaw_logits)], dim=1).cpu())
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 2), np.float32)

    def process(self, row: Row) -> Row:
        frames = row["frames"]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [T,R,R,3], got {frames.dtype} {frames.shape}")
        num_frames, height, width, _ = frames.shape
        boxes, source = self.crop_boxes(row, num_frames, min(height, width))
        chosen = [
            int(i) for i in sample_indices(num_frames, self.every, self.max_samples) if boxes[i] is not None
        ]
        crops = np.empty((len(chosen), self.input_size, self.input_size, 3), np.uint8)
        for j, i in enumerate(chosen):
            crops[j] = crop_and_resize(frames[i : i + 1], boxes[i], self.input_size)[0]
        gaze = np.full((num_frames, 2), np.nan, np.float32)
        gaze[chosen] = self.predict(crops)
        row["gaze"] = gaze
        sampled = len(sample_indices(num_frames, self.every, self.max_samples))
        update_json_field(row, "gaze_scores", clip_scores(gaze))
        update_json_field(
            row, "extra", {"gaze_crop": source, "gaze_frames_without_box": sampled - len(chosen)}
        )
        update_json_field(row, "weights", {WEIGHTS_NAME: self.weights_id})
        return row
