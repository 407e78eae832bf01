"""Helpers shared by the face-mask and foreground stage tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from skimage.data import astronaut

from pipeline.stages.face_mask import label_ids, write_tiny_parsenet
from pipeline.weights import load_weight_specs

SIZE = 64  # frames and parsing input: ParseNet is fully convolutional, and slow on CPU at 512


def rigged_parsenet_dir(root: Path, label: str) -> Path:
    """A tiny ParseNet whose last layer predicts `label` at every pixel (same layout, same loader)."""
    path = root / load_weight_specs()["parsenet"].path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_parsenet(path, 0)
    state = torch.load(path, weights_only=True)
    state["out_mask_conv.conv2d.weight"].zero_()
    state["out_mask_conv.conv2d.bias"].fill_(-10.0)
    state["out_mask_conv.conv2d.bias"][label_ids("parsenet", [label])[0]] = 10.0
    torch.save(state, path)
    return root


def clip(num: int = 3) -> np.ndarray:
    """`num` copies of the astronaut portrait at SIZE x SIZE."""
    return np.stack([cv2.resize(astronaut(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)] * num)


def make_row(frames: np.ndarray, bucket: str = "real", face_boxes: str = "", key: str = "k0") -> dict:
    """A decoded DAG row as the stages receive it."""
    return {
        "key": key,
        "clip_id": key,
        "dataset": "demo",
        "identity": "id0",
        "bucket": bucket,
        "frames": frames,
        "face_boxes": face_boxes,
        "extra": "",
        "weights": "",
        "error_stage": "",
        "error": "",
        "message": "",
        "timings": "{}",
        "annotations": "[]",
    }
