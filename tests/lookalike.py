"""Small VFHQ / CelebV-HQ look-alike datasets for tests, made with the demo generator's format writers."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import CelebvhqConfig, VfhqConfig
from pipeline.sources.demo import make_identity, render_clip, write_celebvhq_dataset, write_vfhq_clip

REPO = Path(__file__).resolve().parent.parent


def vfhq_name(ytid: str, clip: int, start: int, num_frames: int) -> str:
    return f"Clip+{ytid}+P0+C{clip}+F{start}-{start + num_frames}"


def make_vfhq_clip(
    root: Path, ytid: str, clip: int, num_frames: int, identity: int = 0, as_zip: bool = False
) -> str:
    """One VFHQ-format clip (meta txt + frames) under root; returns its clip name."""
    config = VfhqConfig()
    (root / config.meta_dir).mkdir(parents=True, exist_ok=True)
    (root / config.frames_dir).mkdir(parents=True, exist_ok=True)
    frames, boxes, points = render_clip(make_identity(identity), num_frames, (192, 144), 40, 1.0, seed=clip)
    name = vfhq_name(ytid, clip, 100 * clip, num_frames)
    write_vfhq_clip(root, config, name, frames, boxes, points, as_zip=as_zip)
    return name


def make_celebvhq(root: Path, clips: dict[str, tuple[str, int, int]]) -> None:
    """CelebV-HQ-format clips {clip_id: (ytb_id, identity, num_frames)} under root."""
    rendered = {
        clip_id: (ytb_id, render_clip(make_identity(ident), n, (128, 128), 64, 0.5, seed=i)[0])
        for i, (clip_id, (ytb_id, ident, n)) in enumerate(clips.items())
    }
    write_celebvhq_dataset(root, CelebvhqConfig(), rendered)
