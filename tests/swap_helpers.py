"""Small clips and manifests for the face-swap stage and identity-bank tests (demo generator faces)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contract import sample_key
from pipeline.manifest import MANIFEST_COLUMNS
from pipeline.segment import decode_segment
from pipeline.sources.demo import make_identity, render_clip
from pipeline.video import encode_mp4

CANVAS = (192, 144)  # w, h of a source frame: a VFHQ-like full frame with the face off-centre
FPS = 25.0


def write_clip(
    folder: Path, clip_id: str, identity: int, num_frames: int, with_boxes: bool = True, black: bool = False
) -> dict:
    """One mp4 clip of a demo identity and its manifest row (boxes in source pixels, or "")."""
    frames, boxes, _ = render_clip(make_identity(identity), num_frames, CANVAS, 60, 1.0, seed=identity)
    if black:
        frames = np.zeros_like(frames)
    source = folder / f"{clip_id}.mp4"
    source.write_bytes(encode_mp4(frames, FPS))
    dataset = "demo-vfhq" if with_boxes else "demo-celebvhq"
    return {
        "key": sample_key(dataset, clip_id, 0),
        "clip_id": clip_id,
        "dataset": dataset,
        "identity": f"person{identity:02d}",
        "source": str(source),
        "source_kind": "video",
        "fps": FPS,
        "segment": 0,
        "frame_start": 0,
        "frame_stop": num_frames,
        "width": CANVAS[0],
        "height": CANVAS[1],
        "face_boxes": json.dumps(boxes.round(1).tolist()) if with_boxes else "",
        "bucket": "swap",
    }


def make_manifest(folder: Path, clips: list[dict]) -> pd.DataFrame:
    """clips: keyword arguments of write_clip (without folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    return pd.DataFrame([write_clip(folder, **clip) for clip in clips], columns=MANIFEST_COLUMNS)


def decoded_row(manifest_row: dict | pd.Series, bucket: str, resolution: int) -> dict:
    """A row as the swap stage receives it: decoded frames, boxes in output pixels, empty json fields."""
    row = dict(manifest_row)
    row.update(bucket=bucket, error_stage="", error="", message="", timings="{}", annotations="[]")
    row.update(extra="", weights="")
    return decode_segment(row, resolution, crop_scale=1.8)
