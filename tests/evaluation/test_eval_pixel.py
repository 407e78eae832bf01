"""Reconstruction and distribution metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import pixel
from evaluation.distribution import frechet_distance, video_clips


def frames(seed: int, count: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_identical_frames_score_perfectly() -> None:
    a = frames(0)
    assert np.all(pixel.psnr(a, a) == pixel.PSNR_CAP)
    assert np.allclose(pixel.ssim(a, a), 1.0, atol=1e-5)
    assert np.all(pixel.l1(a, a) == 0)


def test_psnr_and_l1_match_a_known_error() -> None:
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 10  # every pixel off by 10: MSE 100, PSNR 10*log10(255^2/100)
    b[1, :8] += 20  # half the pixels off by 20: MSE 200
    assert pixel.psnr(b, a) == pytest.approx(
        [10 * np.log10(255**2 / 100), 10 * np.log10(255**2 / 200)], abs=1e-4
    )
    assert pixel.l1(b, a) == pytest.approx([10 / 255, 10 / 255], abs=1e-6)


def test_ssim_falls_with_noise() -> None:
    a = frames(1, size=64)
    rng = np.random.default_rng(2)
    scores = []
    for sigma in (5, 20, 60):
        noisy = np.clip(a.astype(float) + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)
        scores.append(pixel.ssim(noisy, a).mean())
    assert scores[0] > scores[1] > scores[2]


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="resize first"):
        pixel.psnr(frames(0, size=32), frames(0, size=16))


def test_frechet_distance_of_shifted_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, means 2 apart on every axis: d^2 = 4 * 4 = 16 (plus sampling noise).
    assert frechet_distance(a, a + 2.0) == pytest.approx(16.0, abs=1e-3)
    b = rng.normal(0, 2, (4000, 4))  # sd 2 vs 1: trace term 4 * (1 + 4 - 2*2) = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)


def test_video_clips_cover_short_and_long_videos() -> None:
    assert [len(c) for c in video_clips(frames(0, count=5), 16)] == [16]
    assert [len(c) for c in video_clips(frames(0, count=40), 16)] == [16, 16]


def test_frechet_distance_matches_the_general_matrix_square_root() -> None:
    """Both routes (fewer and more samples than dimensions) agree with scipy's sqrtm formula."""
    from scipy import linalg

    rng = np.random.default_rng(3)
    for n, m in ((5, 7), (60, 80)):
        a = rng.normal(0, 1, (n, 6)) @ rng.normal(0, 1, (6, 6))
        b = rng.normal(0.5, 1, (m, 6))
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = np.real(linalg.sqrtm(cov_a @ cov_b))
        expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_fid_inception_pools_like_pytorch_fid() -> None:
    """The A/C/E_1 blocks average without counting padding and E_2 max-pools (pytorch-fid's
    FIDInception blocks): recomputed here for one block from its own layers."""
    import torch

    from evaluation.backbones import InceptionFeatures

    torch.manual_seed(0)
    block = InceptionFeatures().net.Mixed_7c.eval()
    x = torch.randn(1, 2048, 8, 8)
    with torch.no_grad():
        expected = block.branch_pool(torch.nn.functional.max_pool2d(x, 3, 1, 1))
        plain = block.branch_pool(torch.nn.functional.avg_pool2d(x, 3, 1, 1))
        out = block(x)[:, -192:]
    assert torch.allclose(out, expected) and not torch.allclose(out, plain)
