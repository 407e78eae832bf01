"""MegActor: ReferenceNet + AnimateDiff denoiser + DrivenEncoder + CLIP background tokens, as one module.

Data flow of one training step (shapes for B samples of F frames at H x W pixels, h = H/8):

    reference (B,3,H,W) ──VAE──▶ reference latent (B,4,h,w) ──ReferenceNet(t, CLIP tokens)──▶ bank
    reference + background mask ──CLIP──▶ background tokens (B,T,D)   (cross-attention of both UNets)
    driving (B,F,3,H,W) ──DrivenEncoder──▶ (B,F,4,h,w)
    target (B,F,3,H,W) ──VAE──▶ latents ──+noise(t)──▶ noisy (B,F,4,h,w)
    denoiser(cat[noisy 4, reference latent 4, background mask 1, driving 4] = 13 ch, t, tokens, bank)
        ──▶ prediction (B,F,4,h,w), compared by the trainer with noise (or v)
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNetMotionModel
from torch import nn

from model.background import BackgroundEncoder
from model.checkpointing import apply_gradient_checkpointing
from model.components import Components
from model.config import MegActorConfig
from model.driven_encoder import DrivenEncoder
from model.reference_attention import ReferenceBank, install_reference_attention

log = logging.getLogger(__name__)

LATENT_DOWNSAMPLE = 8  # VAE and DrivenEncoder both map 512 px to 64 latents
IN_CHANNEL_GROUPS = ("noisy latent", "reference latent", "background mask", "driving features")
FROZEN_PREFIXES = ("vae.", "background.")


@dataclass
class MegActorBatch:
    """One training batch. Pixel tensors are float in [-1, 1]."""

    reference: torch.Tensor  # (B, 3, H, W) the reference frame
    driving: torch.Tensor  # (B, F, 3, H, W) face-masked grayscale driving frames (gray copied to 3 channels)
    background_mask: torch.Tensor  # (B, 1, H, W) 1 = background of the reference frame, 0 = person
    target: torch.Tensor | None = None  # (B, F, 3, H, W) ground-truth frames; or give target_latents
    target_latents: torch.Tensor | None = None  # (B, F, 4, h, w) already scaled by the VAE factor
    reference_latent: torch.Tensor | None = None  # (B, 4, h, w) cached, scaled like target_latents
    # vae_fingerprint() of the VAE that computed the cached latents; checked against this model's VAE
    latent_vae: str | None = None

    @classmethod
    def random(cls, seed: int, batch: int = 2, frames: int = 3, size: int = 32) -> MegActorBatch:
        """Uniform random pixels and a random background mask, the same for the same seed: a batch of
        the right shapes for tests and benchmarks that need no real data."""
        g = torch.Generator().manual_seed(seed)
        return cls(
            reference=torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
            driving=torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1,
            background_mask=(torch.rand(batch, 1, size, size, generator=g) > 0.5).float(),
            target=torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1,
        )


@dataclass
class MegActorOutput:
    """What the loss needs: MSE(prediction, target), optionally weighted by timestep (e.g. min-SNR)."""

    prediction: torch.Tensor  # (B, F, 4, h, w)
    target: torch.Tensor  # (B, F, 4, h, w) the noise (epsilon) or the velocity (v_prediction)
    timesteps: torch.Tensor  # (B,) int64
    reference_kept: torch.Tensor  # (B,) bool, False where reference dropout removed reference attention


@dataclass
class Condition:
    """Everything computed once from the reference image, shared by all frames and denoising steps."""

    reference_latent: torch.Tensor  # (B, 4, h, w)
    background_tokens: torch.Tensor  # (B, T, D)
    background_latent: torch.Tensor  # (B, 1, h, w)


def build_scheduler(config: MegActorConfig) -> DDIMScheduler:
    """The training and sampling noise schedule (one object: add_noise, get_velocity and step)."""
    if config.prediction_type == "epsilon" and config.samples_terminal_step:
        log.warning(
            "epsilon prediction with zero terminal SNR and %s spacing samples t = %d, where alpha_bar is "
            "floored at %.3g: an epsilon error enters the first step amplified ~1/sqrt(alpha_bar); use "
            "prediction_type=v_prediction or timestep_spacing=leading (docs/model.md)",
            config.timestep_spacing,
            config.num_train_timesteps - 1,
            config.terminal_alpha_bar,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        timestep_spacing=config.timestep_spacing,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1 if config.timestep_spacing == "leading" else 0,
    )
    scheduler.alphas_cumprod.clamp_(min=config.terminal_alpha_bar)
    return scheduler


def build_denoiser(unet: UNet2DConditionModel, motion_adapter: nn.Module) -> UNetMotionModel:
    """SD1.5 UNet + AnimateDiff motion modules, conv_in widened to 13 channels (extra 9 zero-initialised)."""
    # from_unet2d casts to the UNet's dtype and warns about fp32 modules even when the list is empty.
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        denoiser = UNetMotionModel.from_unet2d(unet, motion_adapter)
    finally:
        quiet.setLevel(level)
    old = denoiser.conv_in
    latent = old.in_channels
    widened = nn.Conv2d(3 * latent + 1, old.out_channels, old.kernel_size, old.stride, old.padding)
    widened.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        widened.weight.zero_()
        widened.weight[:, :latent].copy_(old.weight)
        widened.bias.copy_(old.bias)
    denoiser.conv_in = widened
    denoiser.register_to_config(in_channels=widened.in_channels)
    return denoiser


@torch.no_grad()
def vae_encode(vae: AutoencoderKL, frames: torch.Tensor, scale: float, chunk: int = 8) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled posterior-mean latents (N, 4, h, w), float32.

    Autocast off: under the trainer's bf16 autocast the convolutions would otherwise run in bf16, and
    the clean latents the noise is added to would differ from latents cached offline in float32.
    """
    device = frames.device.type
    # Devices without autocast (meta, in the counting benchmark) have nothing to switch off.
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with off:
        flat = frames.to(vae.dtype)
        latents = [vae.encode(part).latent_dist.mean.float() for part in flat.split(chunk)]
        return torch.cat(latents) * scale


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A short hash of the VAE's weights and scaling factor: cached latents name the VAE that made them."""
    digest = hashlib.sha256(repr(float(vae.config.scaling_factor)).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class MegActor(nn.Module):
    def __init__(self, config: MegActorConfig, components: Components) -> None:
        super().__init__()
        self.config = config
        vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        latent = components.vae.config.latent_channels
        if vae_factor != LATENT_DOWNSAMPLE or components.unet.config.in_channels != latent:
            raise ValueError(
                f"components: expected an 8x VAE whose {latent} latent channels feed the UNet, got a "
                f"{vae_factor}x VAE and a UNet with {components.unet.config.in_channels} input channels"
            )
        token_dim = components.image_encoder.config.projection_dim
        if token_dim != components.unet.config.cross_attention_dim:
            raise ValueError(
                f"components: the CLIP projection gives {token_dim}-d tokens, the UNet cross-attention expects "
                f"{components.unet.config.cross_attention_dim}-d"
            )
        self.latent_scale = float(components.vae.config.scaling_factor)
        self.vae = components.vae.requires_grad_(False).eval()
        self.background = BackgroundEncoder(components.image_encoder).requires_grad_(False).eval()
        self.reference_net = components.unet  # ReferenceNet: a full copy of the SD1.5 UNet
        self.denoiser = build_denoiser(components.unet, components.motion_adapter)
        self.driven_encoder = DrivenEncoder(out_channels=latent, ada=config.driven_ada)
        self.scheduler = build_scheduler(config)
        self.bank = ReferenceBank()
        self.reference_layers = install_reference_attention(
            self.reference_net, self.denoiser, config.reference_blocks, self.bank
        )
        self.checkpointed_units = apply_gradient_checkpointing(self, config)

    def train(self, mode: bool = True) -> MegActor:
        super().train(mode)
        self.vae.eval()  # frozen components never switch to training behaviour
        self.background.eval()
        return self

    # --- frozen encoders -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(B, F, 3, H, W) in [-1, 1] -> scaled latents (B, F, 4, h, w).

        Uses the posterior mean, not a sample: deterministic, so latents cached by a data pipeline and
        latents computed here agree (the posterior std of sd-vae-ft-mse is tiny next to the latent scale).
        Float32 and outside any caller's autocast: the noise is added to these (see `forward`).
        """
        latents = vae_encode(self.vae, frames.flatten(0, 1), self.latent_scale, chunk)
        return latents.unflatten(0, frames.shape[:2])

    def vae_fingerprint(self) -> str:
        """vae_fingerprint(self.vae), computed once (hashing the full VAE takes about a second)."""
        if not hasattr(self, "_vae_fingerprint"):
            self._vae_fingerprint = vae_fingerprint(self.vae)
        return self._vae_fingerprint

    def check_cached_latents(self, batch: MegActorBatch) -> None:
        """Cached latents must come from this model's VAE (the same weights and scaling factor)."""
        if batch.latent_vae is None or batch.latent_vae == self.vae_fingerprint():
            return
        raise ValueError(
            f"the batch's cached latents were computed with VAE {batch.latent_vae}, this model's VAE is "
            f"{self.vae_fingerprint()}: rebuild the cache with the training weights (python -m pipeline "
            "latents --profile/--weights-dir as model.profile/model.weights_dir) or set data.latents=off"
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(B, F, 4, h, w) -> frames (B, F, 3, H, W) in [-1, 1]."""
        flat = latents.flatten(0, 1).to(self.vae.dtype) / self.latent_scale
        frames = [self.vae.decode(part).sample for part in flat.split(chunk)]
        return torch.cat(frames).clamp(-1, 1).unflatten(0, latents.shape[:2])

    @torch.no_grad()
    def encode_condition(
        self,
        reference: torch.Tensor,
        background_mask: torch.Tensor,
        reference_latent: torch.Tensor | None = None,
    ) -> Condition:
        """reference (B, 3, H, W), background_mask (B, 1, H, W) -> the per-clip conditioning.

        reference_latent (B, 4, h, w): the reference's cached latent; encoded here when None.
        """
        if reference_latent is None:
            reference_latent = self.encode_frames(reference[:, None])[:, 0]  # (B, 4, h, w)
        reference_latent = reference_latent.float()
        # Area pooling keeps the fraction of background per latent cell, so thin borders survive.
        background_latent = F.interpolate(
            background_mask.float(), size=reference_latent.shape[-2:], mode="area"
        )
        tokens = self.background(reference, background_mask.to(reference.dtype))  # (B, T, D)
        return Condition(reference_latent, tokens, background_latent.to(reference_latent.dtype))

    # --- denoising ---------------------------------------------------------------------------------------
    def write_reference(self, condition: Condition, timesteps: torch.Tensor, keep: torch.Tensor) -> None:
        """Run the ReferenceNet on the clean reference latent at the denoising timestep; fill the bank."""
        self.bank.clear()
        self.bank.keep = keep  # (B,) bool
        dtype = self.reference_net.dtype  # fp32 latents in, the network's own dtype (autocast may lower it)
        self.reference_net(
            condition.reference_latent.to(dtype), timesteps, condition.background_tokens.to(dtype)
        )

    def denoise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition, driven: torch.Tensor
    ) -> torch.Tensor:
        """noisy (B, F, 4, h, w), driven (B, F, 4, h, w) -> prediction (B, F, 4, h, w); needs a filled bank.

        The prediction comes back in float32 whatever precision the denoiser ran in (its parameters' dtype
        or the caller's autocast): the loss and the DDIM arithmetic that read it stay in float32.
        """
        num_frames = noisy.shape[1]
        dtype = self.denoiser.dtype
        per_frame = [condition.reference_latent, condition.background_latent]
        per_frame = [x[:, None].expand(-1, num_frames, -1, -1, -1).to(dtype) for x in per_frame]
        sample = torch.cat([noisy.to(dtype), *per_frame, driven.to(dtype)], dim=2)  # (B, F, 13, h, w)
        tokens = condition.background_tokens.to(dtype).repeat_interleave(num_frames, dim=0)  # (B*F, T, D)
        out = self.denoiser(sample.transpose(1, 2), timesteps, tokens).sample  # (B, 4, F, h, w)
        return out.transpose(1, 2).float()

    def forward(
        self,
        batch: MegActorBatch,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> MegActorOutput:
        """One training step's model part: noise the target latents and predict the noise (or v).

        `timesteps` (B,) fixes the noise levels (held-out validation); by default they are drawn. The
        latents, the noise, the noising, the target and the returned prediction are float32 even under
        the caller's bf16 autocast, which only reaches the networks: in bf16 the noise level at t = 0
        and 1 rounds to exactly 0 and only 14 distinct levels remain below t = 50.
        """
        if batch.target_latents is not None or batch.reference_latent is not None:
            self.check_cached_latents(batch)
        latents = (
            batch.target_latents if batch.target_latents is not None else self.encode_frames(batch.target)
        )
        batch_size, device = latents.shape[0], latents.device
        condition = self.encode_condition(batch.reference, batch.background_mask, batch.reference_latent)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        with torch.autocast(device.type, enabled=False):
            latents = latents.float()
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
            offset = torch.randn(batch_size, 1, latents.shape[2], 1, 1, generator=generator, device=device)
            noise = noise + self.config.noise_offset * offset  # (B, F, 4, h, w)
            drawn = (rand(batch_size) * self.config.num_train_timesteps).long()  # (B,), drawn either way
            timesteps = drawn if timesteps is None else timesteps.to(device=device, dtype=torch.long)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)  # casts alpha_bar to fp32 latents
            if self.config.prediction_type == "epsilon":
                target = noise
            else:
                target = self.scheduler.get_velocity(latents, noise, timesteps)
        keep = rand(batch_size) >= (self.config.reference_dropout if self.training else 0.0)  # (B,) bool

        driven = self.driven_encoder(batch.driving, batch.reference if self.config.driven_ada else None)
        self.write_reference(condition, timesteps, keep)
        prediction = self.denoise(noisy, timesteps, condition, driven)  # float32
        return MegActorOutput(prediction, target, timesteps, keep)

    # --- training sets -----------------------------------------------------------------------------------
    def unused_parameter_names(self) -> list[str]:
        """ReferenceNet parameters that never reach the loss: everything after the last bank write.

        The last written self-attention is in the ReferenceNet's last transformer block; that block's
        attention, cross-attention and feed-forward, its Transformer2D proj_out, and the UNet's output
        layers only produce the ReferenceNet's own noise prediction, which nobody reads. They are kept (so
        the ReferenceNet stays a loadable SD1.5 UNet) but never trained, so DDP needs no
        find_unused_parameters.
        """
        last_up = len(self.reference_net.up_blocks) - 1
        attentions = getattr(self.reference_net.up_blocks[last_up], "attentions", None)
        if not attentions:
            raise ValueError("ReferenceNet: expected cross-attention in its last up block (SD1.5 layout)")
        transformer = f"reference_net.up_blocks.{last_up}.attentions.{len(attentions) - 1}"
        last_block = f"{transformer}.transformer_blocks.{len(attentions[-1].transformer_blocks) - 1}."
        tail = (f"{transformer}.proj_out.", "reference_net.conv_norm_out.", "reference_net.conv_out.")
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith(tail)
            or (name.startswith(last_block) and not name.startswith(last_block + "norm1."))
        ]

    def trainable_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """Set requires_grad for a stage (config.trainable patterns) and return the trainable parameters."""
        if stage not in self.config.trainable:
            raise ValueError(f"stage: expected one of {sorted(self.config.trainable)}, got {stage!r}")
        patterns = self.config.trainable[stage]
        unused = set(self.unused_parameter_names())
        names = [name for name, _ in self.named_parameters()]
        for pattern in patterns:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            frozen = [n for n in matched if n.startswith(FROZEN_PREFIXES)]
            if not matched or frozen:
                raise ValueError(
                    f"trainable pattern {pattern!r} of {stage}: expected it to match trainable parameters, "
                    f"got {len(matched)} matches, {len(frozen)} of them in the frozen VAE / CLIP"
                )
        selected: dict[str, nn.Parameter] = {}
        for name, param in self.named_parameters():
            on = name not in unused and any(fnmatch.fnmatchcase(name, p) for p in patterns)
            param.requires_grad_(on)
            if on:
                selected[name] = param
        log.info("%s: %d trainable tensors, %.1fM parameters", stage, len(selected), count(selected) / 1e6)
        return selected


def count(params: dict[str, nn.Parameter] | nn.Module) -> int:
    """Number of scalars in a module or a name -> parameter dict."""
    values = params.parameters() if isinstance(params, nn.Module) else params.values()
    return sum(p.numel() for p in values)
