"""Animate a reference portrait with a driving video.

    python -m model.animate --ref IMG --driving VIDEO --weights DIR --out OUT.mp4 [key=value ...]

key=value sets any field of SamplingConfig (num_inference_steps, guidance_scale, eta, context_frames,
context_overlap, seed, progress) or AnimateOptions (resolution, max_frames, face_mask, device, fps).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import apply_overrides
from model.loading import load_megactor
from model.preprocess import (
    prepare_background_mask,
    prepare_driving,
    prepare_reference,
    read_image,
    to_uint8_frames,
)
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline.video import encode_mp4, probe_video, read_video_frames

log = logging.getLogger("model.animate")


@dataclass
class AnimateOptions:
    resolution: int = 512  # must be a multiple of 8; the tiny profile runs at 64
    max_frames: int = 0  # 0 = every frame of the driving video
    face_mask: str = "none"  # "none" | "facexlib" (see model.preprocess.mask_faces)
    face_weights: str = ""  # facexlib weights folder for face_mask=facexlib; "" = $WEIGHTS_DIR
    face_model: str = "parsenet"  # "parsenet" | "bisenet"
    device: str = "auto"  # "auto" = cuda when available
    fps: float = 0.0  # 0 = the driving video's frame rate


def split_overrides(items: list[str]) -> tuple[SamplingConfig, AnimateOptions]:
    """Route each key=value to the dataclass that has the key."""
    sampling_keys = {f.name for f in dataclasses.fields(SamplingConfig)}
    option_keys = {f.name for f in dataclasses.fields(AnimateOptions)}
    unknown = [item for item in items if item.partition("=")[0] not in sampling_keys | option_keys]
    if unknown:
        raise ValueError(
            f"unknown settings {unknown}; expected keys from {sorted(sampling_keys | option_keys)}"
        )
    sampling = apply_overrides(SamplingConfig(), [i for i in items if i.partition("=")[0] in sampling_keys])
    options = apply_overrides(AnimateOptions(), [i for i in items if i.partition("=")[0] in option_keys])
    return sampling, options


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m model.animate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", type=Path, required=True, help="reference image")
    parser.add_argument("--driving", type=Path, required=True, help="driving video")
    parser.add_argument("--weights", type=Path, required=True, help="weights folder (see model.loading)")
    parser.add_argument("--out", type=Path, required=True, help="output .mp4")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="MegActor checkpoint (default WEIGHTS/megactor)"
    )
    parser.add_argument(
        "--ref-mask", type=Path, default=None, help="reference foreground mask image, white = person"
    )
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sampling, options = split_overrides(args.settings)
    if options.resolution % 8:
        raise ValueError(f"resolution: expected a multiple of 8, got {options.resolution}")

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_megactor(args.weights, args.checkpoint).to(device)
    reference = prepare_reference(read_image(args.ref), options.resolution)
    mask = prepare_background_mask(read_image(args.ref_mask), options.resolution) if args.ref_mask else None
    frames = read_video_frames(args.driving, 0, options.max_frames or None)
    face_weights = options.face_weights or os.environ.get("WEIGHTS_DIR")
    driving = prepare_driving(
        frames, options.resolution, options.face_mask, face_weights, options.face_model, device
    )
    log.info("animating %d driving frames at %d px", len(driving), options.resolution)

    video = MegActorPipeline(model)(reference, driving, mask, sampling)  # (F, 3, R, R) in [-1, 1]
    pixels = to_uint8_frames(video)
    fps = options.fps or probe_video(args.driving).fps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_mp4(pixels, fps))
    log.info("wrote %s (%d frames, %.2f fps)", args.out, len(pixels), fps)
    return args.out


if __name__ == "__main__":
    main()
