"""Animate a reference portrait with a driving video.

    python -m model.animate --ref IMG --driving VIDEO --weights DIR --out OUT.mp4 [key=value ...]

key=value sets any field of SamplingConfig (num_inference_steps, guidance_scale, eta, context_frames,
context_overlap, seed, progress) or AnimateOptions (resolution, max_frames, face_mask, ref_mask,
face_weights, face_model, foreground_backend, parsing_size, device, fps).

By default the inputs are prepared the way training saw them: the driving video face-masked by the shard
builder's face-mask stage, the reference's background mask from its foreground stage (both read their
weights from face_weights, else $WEIGHTS_DIR, else --weights). `face_mask=none` / `ref_mask=none` opt out
(for inputs already masked, or to compare); `--ref-mask FILE` gives the reference's mask as an image.
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
    foreground_background_mask,
    prepare_background_mask,
    prepare_driving,
    prepare_reference,
    read_image,
    square_resize,
    to_uint8_frames,
)
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline.video import encode_mp4, probe_video, read_video_frames

log = logging.getLogger("model.animate")


@dataclass
class AnimateOptions:
    resolution: int = 512  # must be a multiple of 8; the tiny profile runs at 64
    max_frames: int = 0  # 0 = every frame of the driving video
    face_mask: str = "facexlib"  # "facexlib" (the face-mask stage, as in training) | "none"
    ref_mask: str = (
        "foreground"  # "foreground" (the foreground stage, as in training) | "none" (all background)
    )
    face_weights: str = (
        ""  # annotator weights folder (configs/weights.yaml); "" = $WEIGHTS_DIR, else --weights
    )
    face_model: str = "parsenet"  # "parsenet" | "bisenet"
    foreground_backend: str = "auto"  # the foreground stage's backend: "auto" | "densepose" | "parsing"
    parsing_size: int = 512  # face-parsing input side of both stages (the shard builder's 512)
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


REF_MASK_METHODS = ("foreground", "none")


def prepare_inputs(
    ref: Path, driving_path: Path, ref_mask: Path | None, weights: Path, options: AnimateOptions, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """reference (3, R, R), driving (F, 3, R, R) and background mask (1, R, R) or None (all background)."""
    if options.ref_mask not in REF_MASK_METHODS:
        raise ValueError(f"ref_mask: expected one of {REF_MASK_METHODS}, got {options.ref_mask!r}")
    annotator_weights = options.face_weights or os.environ.get("WEIGHTS_DIR") or str(weights)
    image = read_image(ref)
    reference = prepare_reference(image, options.resolution)
    if ref_mask is not None:
        mask = prepare_background_mask(read_image(ref_mask), options.resolution)
    elif options.ref_mask == "foreground":
        square = square_resize(image[None], options.resolution)[0]  # the pixels `reference` holds
        mask = foreground_background_mask(
            square,
            annotator_weights,
            options.foreground_backend,
            options.face_model,
            device,
            options.parsing_size,
        )
    else:
        mask = None
    frames = read_video_frames(driving_path, 0, options.max_frames or None)
    driving = prepare_driving(
        frames,
        options.resolution,
        options.face_mask,
        annotator_weights,
        options.face_model,
        device,
        options.parsing_size,
    )
    return reference, driving, mask


# What --help says about the settings most runs change; every field is listed with its default.
SETTING_NOTES = {
    "num_inference_steps": "DDIM steps",
    "guidance_scale": "classifier-free guidance (1.0 = off, half the compute)",
    "guidance_rescale": "null = 0.7 for v-prediction + zero terminal SNR, else 0",
    "max_frames": "0 = every frame of the driving video",
    "resolution": "a multiple of 8; the tiny profile runs at 64",
    "face_mask": "facexlib (as training saw it) | none (driving already masked)",
    "ref_mask": "foreground (as training saw it) | none (all background)",
    "device": "auto = cuda when available",
    "fps": "0 = the driving video's frame rate",
}


def settings_help() -> str:
    """The key=value settings and their defaults, for --help."""
    lines = ["settings (key=value, any number):"]
    for title, cls in (("sampling", SamplingConfig), ("inputs", AnimateOptions)):
        lines.append(f"  {title}:")
        for field in dataclasses.fields(cls):
            default = "null" if field.default is None else field.default
            note = SETTING_NOTES.get(field.name, "")
            lines.append(f"    {f'{field.name}={default}':<30}{note}".rstrip())
    lines.append("example: resolution=64 max_frames=16 num_inference_steps=4 face_mask=none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m model.animate",
        description=__doc__.split("\n\n")[0],
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ref", type=Path, required=True, help="reference image (or a video: its first frame)"
    )
    parser.add_argument("--driving", type=Path, required=True, help="driving video")
    parser.add_argument("--weights", type=Path, required=True, help="weights folder (see model.loading)")
    parser.add_argument("--out", type=Path, required=True, help="output .mp4")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="MegActor checkpoint (default WEIGHTS/megactor)"
    )
    parser.add_argument(
        "--ref-mask",
        type=Path,
        default=None,
        help="reference foreground mask image, white = person (default: the foreground stage's mask)",
    )
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sampling, options = split_overrides(args.settings)
    if options.resolution % 8:
        raise ValueError(f"resolution: expected a multiple of 8, got {options.resolution}")

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    reference, driving, mask = prepare_inputs(
        args.ref, args.driving, args.ref_mask, args.weights, options, device
    )
    model = load_megactor(args.weights, args.checkpoint).to(device)
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
