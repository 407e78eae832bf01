"""Stylisation (style bucket only): SDXL-Turbo img2img turns each frame of a clip into an anime-style
driving frame, with one seed per clip so every frame starts from the same noise.

The authors ran sdxl-turbo through diffusers' image-to-image pipeline at 512², 30 steps, strength 0.5,
re-seeding the generator with 0 before every frame (REFERENCE.md §2). We keep their numbers and their
"same noise for every frame" rule, but derive the seed from the clip id, so different clips get
different noise while the frames of one clip stay temporally consistent.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.rows import Row, update_json_field
from pipeline.stages import stylise_tiny
from pipeline.stages.base import Stage, register_stage
from pipeline.stages.device import limit_torch_memory, resolve_device
from pipeline.weights import MissingWeights, load_weight_specs

log = logging.getLogger(__name__)

WEIGHTS_NAME = "sdxl_turbo"
# The authors' prompt, verbatim (REFERENCE.md §2).
DEFAULT_PROMPT = (
    "A high-resolution anime-style portrait of a person with the same facial expression, same mouth "
    "movements and pose as the original photo, emphasizing fine details and smooth lines, with vibrant colors"
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def clip_seed(base_seed: int, clip_id: str) -> int:
    """The noise seed of one clip: a stable hash of (base seed, clip id), in [0, 2**31)."""
    digest = hashlib.sha256(f"{int(base_seed)}:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def denoising_steps(steps: int, strength: float) -> int:
    """How many steps diffusers' img2img runs: int(steps * strength) (0 means the image is returned as is)."""
    return min(int(steps * strength), steps)


def load_sdxl_img2img(folder: Path, dtype: torch.dtype, variant: str | None = None):
    """SDXL img2img pipeline from a local diffusers folder (real sdxl-turbo or the tiny one), no network."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if not (folder / "model_index.json").is_file():
        raise MissingWeights(
            f"{WEIGHTS_NAME}: expected a diffusers folder with model_index.json at {folder} "
            f"(get it from {load_weight_specs()[WEIGHTS_NAME].origin})"
        )
    try:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder,
            local_files_only=True,
            dtype=dtype,
            variant=variant,
            add_watermarker=False,  # no invisible-watermark encoder: driving frames are training inputs
        )
    except Exception as exc:
        raise RuntimeError(
            f"{WEIGHTS_NAME}: could not load the SDXL pipeline from {folder}: {type(exc).__name__}: {exc}"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


@register_stage
class StyliseStage(Stage):
    """SDXL-Turbo img2img on every frame of a style-bucket clip -> `driving_frames` (style.mp4)."""

    name: ClassVar[str] = "stylise"
    buckets: ClassVar[tuple[str, ...] | None] = ("style",)
    outputs: ClassVar[dict[str, Any]] = {
        "driving_frames": np.zeros((0, 1, 1, 3), np.uint8),
        "style_prompt": "",
        "style_seed": -1,  # the writer reads -1 as "no seed"
        "weights": "",
    }

    def __init__(
        self,
        weights_dir: str,
        prompt: str = DEFAULT_PROMPT,
        steps: int = 30,
        strength: float = 0.5,
        guidance_scale: float = 0.0,
        size: int = 512,
        seed: int = 0,
        frame_batch: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        variant: str | None = None,
        gpu_share: float = 0.0,
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if denoising_steps(int(steps), float(strength)) < 1:
            raise ValueError(
                f"steps * strength must be >= 1 (img2img runs int(steps * strength) denoising steps, "
                f"so it would return the input unchanged), got steps={steps}, strength={strength}"
            )
        if float(guidance_scale) < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if int(size) <= 0 or int(size) % 32:
            raise ValueError(f"size must be a positive multiple of 32 (SDXL latent grid), got {size}")
        if int(frame_batch) < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        self.prompt = prompt
        self.steps, self.strength = int(steps), float(strength)
        self.guidance_scale = float(guidance_scale)
        self.size, self.seed, self.frame_batch = int(size), int(seed), int(frame_batch)
        self.device = resolve_device(device)
        limit_torch_memory(self.device, gpu_share)
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = DTYPES[dtype]
        if self.device.type == "cpu":
            # Random and real weights alike produce denormal floats on CPU, which run ~10x slower.
            torch.set_flush_denormal(True)

        folder = Path(weights_dir) / load_weight_specs()[WEIGHTS_NAME].path
        self.pipe = load_sdxl_img2img(folder, self.dtype, variant).to(self.device)
        self.weights_id = "tiny" if (folder / stylise_tiny.TINY_MARKER).exists() else folder.name
        # The prompt is the same for every frame: encode it once per actor, not once per batch.
        with torch.inference_mode():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=self.prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        self.prompt_embeds, self.pooled_embeds = embeds, pooled

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        return [WEIGHTS_NAME]

    def process(self, row: Row) -> Row:
        frames = np.asarray(row["frames"])
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"expected frames uint8 [T,R,R,3] with T > 0, got {frames.dtype} {frames.shape}")
        seed = clip_seed(self.seed, str(row["clip_id"]))
        styled = np.empty_like(frames)
        with torch.inference_mode():
            for start in range(0, len(frames), self.frame_batch):
                chunk = frames[start : start + self.frame_batch]
                styled[start : start + len(chunk)] = self.stylise(chunk, seed)
        row["driving_frames"] = styled
        row["style_prompt"] = self.prompt
        row["style_seed"] = seed
        update_json_field(row, "weights", {WEIGHTS_NAME: self.weights_id})
        return row

    def stylise(self, frames: np.ndarray, seed: int) -> np.ndarray:
        """uint8 [N,H,W,3] -> uint8 [N,H,W,3]; every frame gets noise from a generator seeded with `seed`."""
        count, height, width, _ = frames.shape
        images = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
        if (height, width) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        # One generator per frame, all with the clip's seed: the VAE sample, the img2img start noise and
        # every ancestral step draw the same numbers for frame i as for frame 0.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(count)]
        out = self.pipe(
            image=images.clamp(0, 1),
            prompt_embeds=self.prompt_embeds.repeat(count, 1, 1),
            pooled_prompt_embeds=self.pooled_embeds.repeat(count, 1),
            strength=self.strength,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            output_type="pt",
        ).images  # (N, 3, size, size) in [0, 1]
        out = out.float()
        if (height, width) != (self.size, self.size):
            out = F.interpolate(out, size=(height, width), mode="bilinear", antialias=True)
        out = (out.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return out.permute(0, 2, 3, 1).cpu().numpy()
