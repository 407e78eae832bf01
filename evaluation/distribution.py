"""Distribution metrics: FID (Inception pool3 features of every frame) and FVD (I3D features of
16-frame clips at 224x224), both the Frechet distance between Gaussians fitted to the two feature sets.

tr sqrt(cov_a cov_b) is computed exactly without scipy's general sqrtm (see `_trace_sqrt_product`), so
rank-deficient covariances (fewer samples than feature dimensions) need no regularising offset. Values
are only comparable between runs with the same number of samples (metrics.json records it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluation.frames import to_float

FVD_CLIP_FRAMES = 16
FVD_SIZE = 224


@dataclass(frozen=True)
class Protocol:
    """How many samples a published FID / FVD uses and how they are drawn; below `fvd_videos` /
    `fid_frames` the number is reported under a name carrying its N (fvd_n<N>), not as fvd."""

    name: str
    fvd_videos: int  # videos, one clip each
    fvd_frames: int  # frames per clip; a shorter video is skipped (and counted), never padded
    fid_frames: int  # generated frames
    ddof: int  # covariance divisor N - ddof


# StyleGAN-V: fvd2048_16f (2,048 videos, one 16-frame clip each, shorter videos skipped) and StyleGAN's
# fid50k (50,000 frames); covariances from its FeatureStats, i.e. divided by N.
PROTOCOLS = {"stylegan-v": Protocol("stylegan-v", 2048, FVD_CLIP_FRAMES, 50_000, 0)}
DEFAULT_PROTOCOL = "stylegan-v"


def protocol_clip(frames: np.ndarray, protocol: Protocol) -> list[np.ndarray]:
    """The protocol's one clip of a video (its first `fvd_frames` frames); none for a shorter video."""
    return [frames[: protocol.fvd_frames]] if len(frames) >= protocol.fvd_frames else []


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray, ddof: int = 1) -> float:
    """tr sqrt(cov_a @ cov_b) for centred rows a (N, D), b (M, D), without a general matrix square root.

    cov_a = AᵀA and cov_b = BᵀB with A = a/sqrt(N-ddof), B = b/sqrt(M-ddof). The eigenvalues of AᵀA·BᵀB are
    those of (ABᵀ)(ABᵀ)ᵀ, so the trace is the sum of ABᵀ's singular values: an (N, M) SVD, exact and
    cheap when there are fewer samples than dimensions. With more samples: the eigenvalues of the
    symmetric S·cov_b·S, S = cov_a^(1/2) by eigendecomposition (both routes are real by construction)."""
    n, m, dims = len(a), len(b), a.shape[1]
    left, right = a / np.sqrt(n - ddof), b / np.sqrt(m - ddof)
    if min(n, m) <= dims:
        return float(np.linalg.svd(left @ right.T, compute_uv=False).sum())
    values, vectors = np.linalg.eigh(left.T @ left)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root @ (right.T @ right) @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray, ddof: int = 1) -> float:
    """Frechet distance between Gaussians fitted to feature rows a (N, D) and b (M, D); N, M >= 2:
    |mu_a - mu_b|² + tr(cov_a) + tr(cov_b) - 2 tr sqrt(cov_a cov_b), covariances divided by N - ddof
    (1: the unbiased estimate, pytorch-fid; 0: StyleGAN's FeatureStats)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per side, got {len(a)} and {len(b)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    trace_a = (a**2).sum() / (len(a) - ddof)
    trace_b = (b**2).sum() / (len(b) - ddof)
    value = ((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * _trace_sqrt_product(a, b, ddof)
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
