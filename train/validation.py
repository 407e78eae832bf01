"""The validation video rank 0 renders every few steps: driving | generated | ground truth, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.megactor import MegActor
from model.preprocess import to_uint8_frames
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline.video import encode_mp4
from pipeline.writer import atomic_write_bytes
from train.config import ValidationConfig

VIDEO_FPS = 8.0


@torch.no_grad()
def render_validation(model: MegActor, batch: dict[str, Any], config: ValidationConfig) -> np.ndarray:
    """The first sample of a fixed batch animated from its own reference and driving frames."""
    model_device = next(model.denoiser.parameters()).device
    sampling = SamplingConfig(
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        context_frames=batch["driving"].shape[1],
        context_overlap=0,
        progress=False,
    )
    generated = MegActorPipeline(model)(
        batch["reference"][0].to(model_device),
        batch["driving"][0].to(model_device),
        batch["background_mask"][0].to(model_device),
        sampling,
    )
    panels = [batch["driving"][0], generated.cpu(), batch["target"][0]]
    return np.concatenate([to_uint8_frames(p) for p in panels], axis=2)  # (F, H, 3W, 3)


def write_validation_video(
    model: MegActor, batch: dict[str, Any], config: ValidationConfig, out_dir: Path, step: int
) -> Path:
    """Render and write validation/step_NNNNNNN.mp4 (atomically); the caller restores train mode."""
    frames = render_validation(model, batch, config)
    path = out_dir / f"step_{step:07d}.mp4"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_mp4(frames, VIDEO_FPS))
    return path
