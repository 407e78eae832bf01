"""Gaze (pitch, yaw) per frame with the project's L2CS-Net (pipeline/stages/l2cs.py) on square face
crops around each frame's face box (the gaze stage's crop: side = the box's longer side), at 448²."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.stages.gaze import square_around
from pipeline.stages.l2cs import WEIGHTS_NAME, decode_gaze360, load_l2cs, normalise
from pipeline.video import crop_and_resize_frame
from pipeline.weights import file_id

INPUT_SIZE = 448


class GazeEstimator:
    def __init__(self, path: Path, device: torch.device | str = "cpu", batch: int = 16) -> None:
        self.device = torch.device(device)
        self.model = load_l2cs(path, self.device)
        self.batch = batch
        self.weights = {WEIGHTS_NAME: file_id(path)}

    @torch.no_grad()
    def predict(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """uint8 frames (T,H,W,3) and face boxes (T,4; NaN = none) -> (T,2) radians, NaN without a box."""
        out = np.full((len(frames), 2), np.nan, np.float32)
        crops, where = [], []
        for t, box in enumerate(boxes):
            square = square_around(box, 1.0)
            if square is not None:
                crops.append(crop_and_resize_frame(frames[t], square, INPUT_SIZE))
                where.append(t)
        for start in range(0, len(crops), self.batch):
            x = normalise(np.stack(crops[start : start + self.batch]), self.device)
            pitch, yaw = self.model(x)
            out[where[start : start + self.batch]] = (
                torch.stack([decode_gaze360(pitch), decode_gaze360(yaw)], dim=1).cpu().numpy()
            )
        return out
