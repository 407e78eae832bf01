"""The pretrained components MegActor starts from, their `tiny` and `full` architectures, and their folders.

A weights folder holds the components in their own libraries' on-disk formats:

    unet/            SD1.5 UNet2DConditionModel (diffusers)       -> ReferenceNet and the denoiser's base
    vae/             sd-vae-ft-mse AutoencoderKL (diffusers)
    image_encoder/   CLIP ViT-L/14 CLIPVisionModelWithProjection (transformers)
    motion_adapter/  AnimateDiff v3 MotionAdapter (diffusers)

The `tiny` profile is the same four folders with small random-weight models, written by
`write_random_components` and read by the same `load_components` that reads the real weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

log = logging.getLogger(__name__)

REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "image_encoder": ("config.json", "model.safetensors"),
    "motion_adapter": ("config.json", "diffusion_pytorch_model.safetensors"),
}

# Architectures. `full` = the public checkpoints' shapes: SD1.5 UNet, sd-vae-ft-mse, CLIP ViT-L/14 vision
# tower, AnimateDiff v3 (sd15) motion adapter. `tiny` mirrors their structure (a plain down block last, a
# plain up block first, 8x VAE downsampling, no motion mid block) at a size a CPU test can run.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,  # diffusers' legacy name: SD1.5 has 8 heads
            cross_attention_dim=768,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        "image_encoder": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        "motion_adapter": dict(
            block_out_channels=(320, 640, 1280, 1280),
            motion_layers_per_block=2,
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            motion_max_seq_length=32,
            use_motion_mid_block=False,
        ),
    },
    "tiny": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        "image_encoder": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
            hidden_act="quick_gelu",
        ),
        "motion_adapter": dict(
            block_out_channels=(32, 64),
            motion_layers_per_block=1,
            motion_num_attention_heads=2,
            motion_norm_num_groups=32,
            motion_max_seq_length=32,
            use_motion_mid_block=False,
        ),
    },
}


@dataclass
class Components:
    """The four pretrained models MegActor is assembled from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    motion_adapter: MotionAdapter


def build_components(profile: str) -> Components:
    """Random-weight components of a profile (on the current default device: use "meta" for `full`)."""
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {sorted(PROFILES)}, got {profile!r}")
    spec = PROFILES[profile]
    return Components(
        unet=UNet2DConditionModel(**spec["unet"]),
        vae=AutoencoderKL(**spec["vae"]),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["image_encoder"])),
        motion_adapter=MotionAdapter(**spec["motion_adapter"]),
    )


def write_random_components(out_dir: str | Path, profile: str = "tiny", seed: int = 0) -> Path:
    """Write a profile's components with random weights as a weights folder (the real on-disk formats)."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    components = build_components(profile)
    for name in REQUIRED_FILES:
        getattr(components, name).save_pretrained(out / name, safe_serialization=True)
    log.info("wrote random %s components to %s", profile, out)
    return out


def check_weights_dir(weights_dir: str | Path, verify_hash: bool = False) -> None:
    """Raise one FileNotFoundError naming every missing component file and, with verify_hash (real
    weights only: the tiny profile's random files have no published hash), every file whose size or
    sha256 differs from configs/weights.yaml."""
    root = Path(weights_dir)
    problems = [
        f"{root / component / file}: missing"
        for component, files in REQUIRED_FILES.items()
        for file in files
        if not (root / component / file).is_file()
    ]
    if verify_hash and not problems:
        from pipeline.weights import verify_job

        problems += verify_job(root, "train")
    if problems:
        raise FileNotFoundError(
            f"weights folder {root} has {len(problems)} problem(s) (python -m pipeline weights fetch --for "
            "train gets the right files):\n  " + "\n  ".join(problems)
        )


def load_components(weights_dir: str | Path) -> Components:
    """Load the four components from a local weights folder; never downloads, never unpickles."""
    check_weights_dir(weights_dir)
    root = Path(weights_dir)
    local = dict(local_files_only=True, use_safetensors=True)
    return Components(
        unet=UNet2DConditionModel.from_pretrained(root / "unet", **local),
        vae=AutoencoderKL.from_pretrained(root / "vae", **local),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder", **local),
        motion_adapter=MotionAdapter.from_pretrained(root / "motion_adapter", **local),
    )
