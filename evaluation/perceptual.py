"""LPIPS (v0.1, AlexNet trunk, learned linear heads) per frame, on RGB scaled to [-1, 1] at the
evaluation resolution; lower is closer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evaluation.frames import to_float


@torch.no_grad()
def lpips_distance(
    model: nn.Module,
    pred: np.ndarray,
    target: np.ndarray,
    device: torch.device | str = "cpu",
    batch: int = 16,
) -> np.ndarray:
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ: resize first")
    out = []
    for start in range(0, len(pred), batch):
        a = to_float(pred[start : start + batch], device) * 2 - 1
        b = to_float(target[start : start + batch], device) * 2 - 1
        out.append(model(a, b).reshape(-1).cpu())
    return torch.cat(out).numpy().astype(np.float32)
