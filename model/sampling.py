"""Animate a reference image with a driving video: DDIM, classifier-free guidance, overlapping context windows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from model.megactor import Condition, MegActor, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """The authors' inference settings by default."""

    num_inference_steps: int = 25
    guidance_scale: float = 4.5  # 1.0 switches guidance off (one branch, half the compute)
    eta: float = 0.0  # DDIM: 0 = deterministic given the initial noise
    context_frames: int = 16  # frames the motion module sees at once (AnimateDiff trains on 16)
    context_overlap: int = 8
    seed: int = 0
    progress: bool = True


def context_windows(num_frames: int, size: int, overlap: int) -> list[range]:
    """Frame windows of `size` frames, consecutive ones sharing `overlap` frames, the last flush with the end."""
    if size <= overlap or overlap < 0:
        raise ValueError(f"context windows: expected 0 <= overlap < size, got size {size}, overlap {overlap}")
    if num_frames <= size:
        return [range(num_frames)]
    starts = list(range(0, num_frames - size + 1, size - overlap))
    if starts[-1] + size < num_frames:
        starts.append(num_frames - size)
    return [range(s, s + size) for s in starts]


def _repeat(condition: Condition, n: int) -> Condition:
    return Condition(*(x.repeat(n, *([1] * (x.ndim - 1))) for x in vars(condition).values()))


class MegActorPipeline:
    """Sampling with a trained MegActor. The unconditional branch of guidance drops reference attention
    (and keeps every other input), the branch reference dropout trains.

    The sampler is the model's own schedule (`build_scheduler(model.config)`: prediction type, spacing,
    zero terminal SNR), so `model.animate` and the trainer's validation videos sample exactly what the
    model was trained for. The networks run in their parameters' dtype (or the caller's autocast); the
    latents, the guidance combination and every DDIM step stay float32.
    """

    def __init__(self, model: MegActor) -> None:
        self.model = model
        self.scheduler = build_scheduler(model.config)  # its own copy: set_timesteps mutates state

    @torch.no_grad()
    def __call__(
        self,
        reference: torch.Tensor,
        driving: torch.Tensor,
        background_mask: torch.Tensor | None = None,
        config: SamplingConfig | None = None,
    ) -> torch.Tensor:
        """reference (3, H, W), driving (F, 3, H, W), background_mask (1, H, W) -> frames (F, 3, H, W).

        Pixels are in [-1, 1]. Without a background mask the whole reference counts as background.
        """
        cfg = config or SamplingConfig()
        model = self.model.eval()
        param = next(model.denoiser.parameters())
        device, dtype = param.device, param.dtype
        if background_mask is None:
            background_mask = torch.ones_like(reference[:1])
        reference, driving = reference.to(device, dtype)[None], driving.to(device, dtype)[None]
        condition = model.encode_condition(reference, background_mask.to(device, dtype)[None])
        windows = context_windows(driving.shape[1], cfg.context_frames, cfg.context_overlap)
        ada_reference = reference if model.config.driven_ada else None
        chunks = driving.split(cfg.context_frames, dim=1)  # bounds the encoder's memory on long videos
        driven = torch.cat([model.driven_encoder(chunk, ada_reference) for chunk in chunks], dim=1)

        guided = cfg.guidance_scale != 1.0
        branches = 2 if guided else 1
        condition = _repeat(condition, branches)
        keep = torch.tensor([False, True] if guided else [True], device=device)  # (branches,)

        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        shape = (1, *driven.shape[1:2], *condition.reference_latent.shape[1:])  # (1, F, 4, h, w)
        latents = torch.randn(shape, generator=generator).to(device) * self.scheduler.init_noise_sigma  # fp32
        self.scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        for t in tqdm(self.scheduler.timesteps, desc="denoising", disable=not cfg.progress):
            timesteps = t.expand(branches)
            model.write_reference(condition, timesteps, keep)  # once per step, read by every window
            total = torch.zeros_like(latents)
            counts = torch.zeros(1, latents.shape[1], 1, 1, 1, device=device)
            for frames in windows:
                window = slice(frames.start, frames.stop)
                noisy = latents[:, window].expand(branches, -1, -1, -1, -1)
                out = model.denoise(  # float32 whatever the networks ran in
                    noisy, timesteps, condition, driven[:, window].expand(branches, -1, -1, -1, -1)
                )
                if guided:
                    uncond, cond = out.chunk(2)
                    out = uncond + cfg.guidance_scale * (cond - uncond)
                total[:, window] += out
                counts[:, window] += 1
            with torch.autocast(device.type, enabled=False):  # DDIM in float32 even under bf16 autocast
                latents = self.scheduler.step(
                    total / counts, t, latents, eta=cfg.eta, generator=generator
                ).prev_sample
        model.bank.clear()
        return model.decode_latents(latents)[0]
