"""The shard contract: member names, their encodings, and the per-sample metadata.

The writer and the trainer's loader both import this module, so a sample is described in one place.
One sample = one clip segment. Members:

| member      | content                                                              |
|-------------|----------------------------------------------------------------------|
| real.mp4    | the cropped clip, H.264, resolution², source fps                    |
| swap.mp4    | face-swapped driving video (swap bucket only), same frames           |
| style.mp4   | SDXL-stylised driving video (style bucket only), same frames         |
| face.npz    | per-frame face mask, bool [T,H,W], bit-packed                        |
| fg.npz      | per-frame foreground mask, bool [T,H,W], bit-packed                  |
| gaze.npy    | float32 [T,2] pitch, yaw in radians (L2CS's naming: column 0 is what |
|             | L2CS draws left-right); NaN where not computed                       |
| json        | SampleMeta                                                           |

Every shard holds samples of one split (train / val / test), named in its stats file, so a reader picks
a split's shards without opening the others.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import __version__ as PIPELINE_VERSION

REAL, SWAP, STYLE = "real.mp4", "swap.mp4", "style.mp4"
FACE_MASK, FG_MASK, GAZE, META = "face.npz", "fg.npz", "gaze.npy", "json"
VIDEO_MEMBER_OF_BUCKET = {"real": REAL, "swap": SWAP, "style": STYLE}
ALL_MEMBERS = (REAL, SWAP, STYLE, FACE_MASK, FG_MASK, GAZE, META)
SPLIT_FIELD = "split"  # in the json, the index and each shard's stats
LABEL_KINDS = ("appearance", "action", "emotion")  # index columns: comma-joined names

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_+\-]")


def sample_key(dataset: str, clip_id: str, segment: int) -> str:
    """A tar-safe key: WebDataset splits member names at the first dot, so keys carry none."""
    return f"{_KEY_UNSAFE.sub('_', dataset)}__{_KEY_UNSAFE.sub('_', clip_id)}__s{segment:03d}"


@dataclass
class SampleMeta:
    """The `json` member; also one row of index.parquet (plus shard name and member sizes)."""

    key: str
    clip_id: str
    dataset: str
    identity: str
    source: str  # the file or folder the frames came from
    fps: float
    num_frames: int
    segment: int
    frame_start: int  # [start, stop) within the source clip's frames
    frame_stop: int
    crop_box: list[int]  # x0, y0, x1, y1 in source pixels (may extend past the frame: padded black)
    resolution: int
    bucket: str
    split: str = "train"  # train | val | test (pipeline/splits.py); shards hold one split each
    labels: dict[str, list[str]] = field(default_factory=dict)  # attribute names (CelebV-HQ)
    swap_source_identity: str | None = None
    style_prompt: str | None = None
    style_seed: int | None = None
    gaze_scores: dict[str, float] = field(default_factory=dict)
    fg_backend: str | None = None
    annotations: list[str] = field(default_factory=list)  # stages that ran on this sample
    weights: dict[str, str] = field(default_factory=dict)  # model name -> weights id
    extra: dict[str, Any] = field(default_factory=dict)  # per-stage counters (e.g. frames without a face)
    pipeline_version: str = PIPELINE_VERSION

    def to_json_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> SampleMeta:
        raw = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def encode_mask(mask: np.ndarray) -> bytes:
    """bool [T,H,W] -> npz holding the bit-packed mask and its shape."""
    if mask.dtype != np.bool_ or mask.ndim != 3:
        raise ValueError(f"expected a bool [T,H,W] mask, got {mask.dtype} {mask.shape}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, bits=np.packbits(mask, axis=None), shape=np.array(mask.shape, np.int64))
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as npz:
        shape = tuple(int(v) for v in npz["shape"])
        count = int(np.prod(shape))
        return np.unpackbits(npz["bits"], count=count).astype(bool).reshape(shape)


def encode_gaze(gaze: np.ndarray) -> bytes:
    """float32 [T,2] (pitch, yaw) radians -> .npy bytes."""
    if gaze.ndim != 2 or gaze.shape[1] != 2:
        raise ValueError(f"expected gaze [T,2], got {gaze.shape}")
    buffer = io.BytesIO()
    np.save(buffer, gaze.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_gaze(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def required_members(meta: SampleMeta) -> set[str]:
    """The members a complete sample of this bucket holds, given the annotators that ran."""
    members = {REAL, META}
    stage_members = {"face_mask": FACE_MASK, "foreground": FG_MASK, "gaze": GAZE}
    members |= {m for stage, m in stage_members.items() if stage in meta.annotations}
    if meta.bucket != "real" and ("swap" in meta.annotations or "stylise" in meta.annotations):
        members.add(VIDEO_MEMBER_OF_BUCKET[meta.bucket])
    return members


def decode_mask_frames(data: bytes, indices: Sequence[int]) -> np.ndarray:
    """bool (len(indices), H, W): only the asked frames of a face.npz / fg.npz member are unpacked.

    The bits are one flat packbits array of the [T,H,W] mask, so frame t is bits [t*H*W, (t+1)*H*W).
    """
    with np.load(io.BytesIO(data)) as npz:
        num_frames, height, width = (int(v) for v in npz["shape"])
        bits = npz["bits"]
    frame_bits = height * width
    out = np.empty((len(indices), height, width), bool)
    for row, t in enumerate(indices):
        t = int(t)
        if not 0 <= t < num_frames:
            raise ValueError(f"mask frame {t} outside a mask of {num_frames} frames")
        first, stop = t * frame_bits, (t + 1) * frame_bits
        chunk = np.unpackbits(bits[first // 8 : (stop + 7) // 8])
        offset = first % 8
        out[row] = chunk[offset : offset + frame_bits].astype(bool).reshape(height, width)
    return out
