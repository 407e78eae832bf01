"""Helpers for the model tests (a plain module: tests/model is not a package)."""

from __future__ import annotations

import torch

from model.megactor import MegActorBatch

FRAMES, PIXELS = 4, 64  # 4 frames of 64x64 pixels = 8x8 latents


def make_batch(
    batch_size: int = 2, frames: int = FRAMES, pixels: int = PIXELS, seed: int = 0
) -> MegActorBatch:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, 1, pixels, pixels)
    mask[..., : pixels // 4, :] = 1  # the top quarter is background
    return MegActorBatch(
        reference=torch.rand(batch_size, 3, pixels, pixels, generator=gen) * 2 - 1,
        driving=torch.rand(batch_size, frames, 1, pixels, pixels, generator=gen).expand(-1, -1, 3, -1, -1) * 2
        - 1,
        background_mask=mask,
        target=torch.rand(batch_size, frames, 3, pixels, pixels, generator=gen) * 2 - 1,
    )


def perturb_(module: torch.nn.Module, scale: float = 0.02, seed: int = 1) -> None:
    """Move every weight off its initial value, so zero-initialised layers pass signal and gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
