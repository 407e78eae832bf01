"""Per-frame reconstruction metrics on pixels: PSNR (dB, peak 255), SSIM (Gaussian 11x11, sigma 1.5, on
RGB in [0,1], the mean over channels), L1 (mean absolute error in [0, 1])."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from evaluation.frames import check_frames, to_float

PSNR_CAP = 100.0  # identical frames: a finite ceiling instead of +inf, so means stay finite


def _pair(pred: np.ndarray, target: np.ndarray) -> None:
    check_frames(pred, "pred")
    check_frames(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ: resize first")


def identical(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per frame: no pixel differs (PSNR is infinite there: counted, never averaged in)."""
    _pair(pred, target)
    return (pred == target).reshape(len(pred), -1).all(axis=1)


def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    _pair(pred, target)
    diff = pred.astype(np.float64) - target.astype(np.float64)
    mse = (diff**2).reshape(len(pred), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        value = 10 * np.log10(255.0**2 / mse)
    return np.minimum(value, PSNR_CAP).astype(np.float32)


def l1(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    _pair(pred, target)
    diff = np.abs(pred.astype(np.float32) - target.astype(np.float32)) / 255.0
    return diff.reshape(len(pred), -1).mean(axis=1)


def ssim(
    pred: np.ndarray, target: np.ndarray, device: torch.device | str = "cpu", batch: int = 32
) -> np.ndarray:
    _pair(pred, target)
    out = []
    for start in range(0, len(pred), batch):
        a = to_float(pred[start : start + batch], device)
        b = to_float(target[start : start + batch], device)
        value = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
        out.append(value.reshape(-1).cpu())
    return torch.cat(out).numpy().astype(np.float32)
