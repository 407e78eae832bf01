"""Animate a reference image with a driving video: DDIM, classifier-free guidance, overlapping context windows."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from model.config import MegActorConfig
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
    # Lin et al. 2023 §3.4: pull the guided prediction's per-sample std back towards the conditional one's
    # (fixes over-exposure at high guidance). None = 0.7 for a v-prediction, zero-terminal-SNR model (their
    # recommendation), else 0.0; 0 = plain classifier-free guidance.
    guidance_rescale: float | None = None
    # Precision of the networks: "bf16" autocast, "off" (their parameters' dtype, even under a caller's
    # autocast) or "auto" (bf16 on CUDA; elsewhere whatever the caller set, so plain fp32 on CPU).
    autocast: str = "auto"
    tf32: bool = True  # on CUDA, TF32 matmuls / convolutions for whatever still runs in float32

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast: expected one of {AUTOCAST_MODES}, got {self.autocast!r}")
        if self.guidance_rescale is not None and not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(
                f"guidance_rescale: expected a value in [0, 1] (or null for the model's default), "
                f"got {self.guidance_rescale}"
            )


AUTOCAST_MODES = ("auto", "off", "bf16")
RECOMMENDED_RESCALE = 0.7  # Lin et al. 2023, for v-prediction with zero terminal SNR


def default_guidance_rescale(config: MegActorConfig) -> float:
    """0.7 for a model trained with v-prediction and zero terminal SNR (Lin et al.), else 0.0."""
    zero_snr_v = config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    return RECOMMENDED_RESCALE if zero_snr_v else 0.0


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Mix the guided prediction with a copy scaled to the conditional prediction's std, per sample.

    The std runs over every dim but the first (a window's frames, channels and pixels), as diffusers'
    `rescale_noise_cfg` does.
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def resolve_autocast(mode: str, device: torch.device) -> str | None:
    """The mode to enforce ("bf16" or "off"), or None to leave the caller's autocast state as it is."""
    if mode == "auto":
        return "bf16" if device.type == "cuda" else None
    return mode


def autocast_context(mode: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if mode == "off":
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions for the duration of a call; the global flags are restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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
    model was trained for. The networks run under `SamplingConfig.autocast` (bf16 on CUDA by default); the
    latents, the guidance combination (and its rescale) and every DDIM step stay float32, and the VAE
    decodes in its parameters' dtype (bf16 would cost the last 8-bit level near white).
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
        device = next(model.denoiser.parameters()).device
        mode = resolve_autocast(cfg.autocast, device)
        rescale = (
            default_guidance_rescale(model.config) if cfg.guidance_rescale is None else cfg.guidance_rescale
        )
        log.debug("sampling: autocast %s, guidance_rescale %.2f", mode or "as the caller set it", rescale)
        with tf32_matmul(cfg.tf32 and device.type == "cuda"):
            with autocast_context(mode, device):
                latents = self._denoise(reference, driving, background_mask, cfg, rescale)
            # Our own bf16 covers the networks that run every step, not the one decode.
            with autocast_context(None if mode is None else "off", device):
                return model.decode_latents(latents)[0]

    def _denoise(
        self,
        reference: torch.Tensor,
        driving: torch.Tensor,
        background_mask: torch.Tensor | None,
        cfg: SamplingConfig,
        rescale: float,
    ) -> torch.Tensor:
        """The float32 latents (1, F, 4, h, w) after every DDIM step."""
        model = self.model
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
                    out = self._guide(out, cfg.guidance_scale, rescale)
                total[:, window] += out
                counts[:, window] += 1
            with torch.autocast(device.type, enabled=False):  # DDIM in float32 even under bf16 autocast
                latents = self.scheduler.step(
                    total / counts, t, latents, eta=cfg.eta, generator=generator
                ).prev_sample
        model.bank.clear()
        return latents

    @staticmethod
    def _guide(out: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
        """Classifier-free guidance of one window's (uncond, cond) pair, in float32; rescaled per window,
        since each window is one prediction of the model."""
        uncond, cond = out.chunk(2)
        guided = uncond + scale * (cond - uncond)
        return rescale_guidance(guided, cond, rescale) if rescale > 0 else guided
