"""Held-out validation beyond the plain loss: the video rank 0 renders every few steps (driving | generated |
ground truth, side by side), reconstruction metrics, and the conditioning diagnostics (val/cond/*)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.megactor import MegActor
from model.preprocess import to_uint8_frames
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline.video import encode_mp4
from pipeline.writer import atomic_write_bytes
from train.config import TrainConfig, ValidationConfig

log = logging.getLogger(__name__)

VIDEO_FPS = 8.0


def _animate_own(model: MegActor, batch: dict[str, Any], index: int, steps: int, config: ValidationConfig):
    """Sample `index` of a fixed batch animated from its own reference and driving frames (seeded)."""
    model_device = next(model.denoiser.parameters()).device
    sampling = SamplingConfig(
        num_inference_steps=steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        context_frames=batch["driving"].shape[1],
        context_overlap=0,
        progress=False,
    )
    return MegActorPipeline(model)(
        batch["reference"][index].to(model_device),
        batch["driving"][index].to(model_device),
        batch["background_mask"][index].to(model_device),
        sampling,
    ).cpu()


@torch.no_grad()
def render_validation(model: MegActor, batch: dict[str, Any], config: ValidationConfig) -> np.ndarray:
    """The first sample of a fixed batch animated from its own reference and driving frames."""
    generated = _animate_own(model, batch, 0, config.num_inference_steps, config)
    panels = [batch["driving"][0], generated, batch["target"][0]]
    return np.concatenate([to_uint8_frames(p) for p in panels], axis=2)  # (F, H, 3W, 3)


@torch.no_grad()
def held_out_metrics(model: MegActor, batch: dict[str, Any], config: ValidationConfig) -> dict[str, float]:
    """PSNR, SSIM and L1 of the first `eval_clips` held-out clips animated from their own reference and
    driving frames with `eval_steps` sampling steps (few: a trend next to the loss, not the final
    numbers; `python -m evaluation run` gives those), frames pooled over clips."""
    from evaluation import pixel

    clips = range(min(config.eval_clips, len(batch["key"])))
    pred = np.concatenate(
        [to_uint8_frames(_animate_own(model, batch, i, config.eval_steps, config)) for i in clips]
    )
    target = np.concatenate([to_uint8_frames(batch["target"][i]) for i in clips])
    return {
        "psnr": float(pixel.psnr(pred, target).mean()),
        "ssim": float(pixel.ssim(pred, target).mean()),
        "l1": float(pixel.l1(pred, target).mean()),
    }


def write_validation_video(
    model: MegActor, batch: dict[str, Any], config: ValidationConfig, out_dir: Path, step: int
) -> Path:
    """Render and write validation/step_NNNNNNN.mp4 (atomically); the caller restores train mode."""
    frames = render_validation(model, batch, config)
    path = out_dir / f"step_{step:07d}.mp4"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_mp4(frames, VIDEO_FPS))
    return path


def conditioning_batch(config: TrainConfig, rank: int) -> dict[str, Any] | None:
    """The conditioning diagnostics' fixed held-out batch (validation.split, cond_samples clips, with the
    real driving frames of swap clips); None, with a warning on rank 0, when none can be read."""
    from train.diagnostics import diagnostic_batch

    section = config.validation
    data = dataclasses.replace(config.data, split=section.split, shards=section.shards or config.data.shards)
    try:
        return diagnostic_batch(data, section.cond_samples, seed=section.seed)
    except (OSError, ValueError) as exc:  # NoShards is a ValueError, missing folders an OSError
        if rank == 0:
            log.warning("conditioning diagnostics skipped: %s", exc)
        return None


def log_conditioning(
    model: torch.nn.Module,
    batch: dict[str, Any],
    config: TrainConfig,
    device: torch.device,
    writer: Any | None,
    step: int,
) -> dict[str, float]:
    """Every rank computes the diagnostics (collective under FSDP); rank 0's writer logs val/cond/*."""
    from train.diagnostics import batch_losses, settings_of, tensorboard_scalars

    losses = batch_losses(model, batch, settings_of(config), device)
    if writer is not None:
        for name, value in tensorboard_scalars(losses).items():
            writer.add_scalar(name, value, step)
        log.info(
            "step %d: conditioning gains driving %+.3f reference %+.3f background %+.3f",
            step,
            losses["gain_driving_shuffled"],
            losses["gain_reference_dropped"],
            losses["gain_background_shuffled"],
        )
    return losses
