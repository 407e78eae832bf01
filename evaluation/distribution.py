"""Distribution metrics: FID (Inception pool3 features of every frame) and FVD (I3D features of
16-frame clips at 224x224), both the Frechet distance between Gaussians fitted to the two feature sets.

With few samples the covariances are rank-deficient; the square root then comes from scipy's sqrtm
(its small imaginary part dropped, as pytorch-fid does) and the value is only comparable between runs
with the same number of samples (metrics.json records it)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import nn

from evaluation.frames import to_float

FVD_CLIP_FRAMES = 16
FVD_SIZE = 224


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows a (N, D) and b (M, D); N, M >= 2."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per side, got {len(a)} and {len(b)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: offset both (pytorch-fid's fallback)
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return float(max(value, 0.0))


@torch.no_grad()
def inception_features(
    model: nn.Module, frames: np.ndarray, device: torch.device | str = "cpu", batch: int = 32
) -> np.ndarray:
    out = [model(to_float(frames[s : s + batch], device)).cpu() for s in range(0, len(frames), batch)]
    return torch.cat(out).numpy()


def video_clips(frames: np.ndarray, length: int = FVD_CLIP_FRAMES) -> list[np.ndarray]:
    """Non-overlapping clips of `length` frames (a video shorter than that is one clip, its last frame
    repeated), so every video contributes at least one clip."""
    if len(frames) < length:
        pad = np.repeat(frames[-1:], length - len(frames), axis=0)
        return [np.concatenate([frames, pad])]
    return [frames[s : s + length] for s in range(0, len(frames) - length + 1, length)]


@torch.no_grad()
def i3d_features(model: nn.Module, clips: list[np.ndarray], device: torch.device | str = "cpu") -> np.ndarray:
    """StyleGAN-V's protocol: each clip resized to 224x224, scaled to [-1, 1], [N,3,T,H,W]."""
    out = []
    for clip in clips:
        x = to_float(clip, device)  # (T, 3, H, W)
        x = nn.functional.interpolate(x, size=(FVD_SIZE, FVD_SIZE), mode="bilinear", align_corners=False)
        x = (x * 2 - 1).permute(1, 0, 2, 3)[None]  # (1, 3, T, 224, 224)
        out.append(model(x, rescale=False, resize=False, return_features=True).cpu())
    return torch.cat(out).numpy()
