"""Small committed shard sets whose content is known, written with the project's own writer.

Frame t of every video carries t in binary (6 black/white cells inside the face square), so any
frame's index can be read back from the real video, the driving video and the loader's tensors.
Layout of a size² frame, c = size / 8:

    rows/cols [2c, 6c)  the face square: a 4x4 grid of c x c cells; cells 0-5 hold the bits of t,
                        cells 6-15 a grey whose level says which video it is (FACE_GREY)
    rows [7c, 8c)       a bright band; the face mask of frame t also covers its cell t % 8
    everything else     a colour per video (BACKGROUND), outside the face mask
    foreground mask     columns [0, (t % 7 + 1) c) of frame t
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import contract
from pipeline.video import EncodeSettings
from pipeline.writer import STATS_SUFFIX, encode_members, write_shard

CODE_BITS = 6
BAND = 220
FACE_GREY = {"real.mp4": 100, "swap.mp4": 150, "style.mp4": 200}
BACKGROUND = {"real.mp4": (200, 60, 40), "swap.mp4": (40, 200, 60), "style.mp4": (60, 40, 200)}


def _cell(size: int, index: int) -> tuple[slice, slice]:
    """Rows and columns of face-square cell `index` (0-15)."""
    c = size // 8
    row, col = divmod(index, 4)
    return slice(2 * c + row * c, 3 * c + row * c), slice(2 * c + col * c, 3 * c + col * c)


def synthetic_frame(t: int, size: int, member: str = contract.REAL) -> np.ndarray:
    """uint8 (size, size, 3): frame t of the video `member` (real.mp4, swap.mp4 or style.mp4)."""
    c = size // 8
    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = BACKGROUND[member]
    frame[2 * c : 6 * c, 2 * c : 6 * c] = FACE_GREY[member]
    for bit in range(CODE_BITS):
        frame[_cell(size, bit)] = 255 if (t >> bit) & 1 else 0
    frame[7 * c :] = BAND
    return frame


def face_mask_of(t: int, size: int) -> np.ndarray:
    """bool (size, size): the face square and band cell t % 8."""
    c = size // 8
    mask = np.zeros((size, size), bool)
    mask[2 * c : 6 * c, 2 * c : 6 * c] = True
    mask[7 * c :, (t % 8) * c : (t % 8 + 1) * c] = True
    return mask


def fg_mask_of(t: int, size: int) -> np.ndarray:
    """bool (size, size): the person of frame t, columns [0, (t % 7 + 1) c)."""
    mask = np.zeros((size, size), bool)
    mask[:, : (t % 7 + 1) * (size // 8)] = True
    return mask


def read_code(frame: np.ndarray) -> int:
    """The frame index a frame carries; `frame` (H, W, C) uint8 or (C, H, W) float in [-1, 1]."""
    if frame.dtype != np.uint8:
        frame = np.moveaxis((np.asarray(frame, np.float32) + 1) * 127.5, 0, -1)
    size = frame.shape[0]
    code = 0
    for bit in range(CODE_BITS):
        rows, cols = _cell(size, bit)
        inner = frame[rows, cols][size // 32 : -(size // 32) or None, size // 32 : -(size // 32) or None]
        code |= int(inner.mean() > 128) << bit
    return code


def face_grey(frame: np.ndarray) -> float:
    """Mean level of the grey face cells (6-15): which video a frame came from (see FACE_GREY)."""
    if frame.dtype != np.uint8:
        frame = np.moveaxis((np.asarray(frame, np.float32) + 1) * 127.5, 0, -1)
    size = frame.shape[0]
    return float(np.mean([frame[_cell(size, i)].mean() for i in range(CODE_BITS, 16)]))


def _row(index: int, bucket: str, length: int, size: int) -> dict:
    key = contract.sample_key("synthetic", f"clip{index:02d}", 0)
    driving = contract.VIDEO_MEMBER_OF_BUCKET[bucket]
    annotations = ["face_mask", "foreground", "gaze"] + {"real": [], "swap": ["swap"], "style": ["stylise"]}[
        bucket
    ]
    return {
        "key": key, "clip_id": f"clip{index:02d}", "dataset": "synthetic", "identity": f"id{index:02d}",
        "source": "synthetic", "fps": 25.0, "num_frames": length, "segment": 0, "frame_start": 0,
        "frame_stop": length, "crop_box": json.dumps([0, 0, size, size]), "bucket": bucket,
        "annotations": json.dumps(annotations), "timings": "{}", "error_stage": "", "error": "", "message": "",
        "frames": np.stack([synthetic_frame(t, size) for t in range(length)]),
        "driving_frames": None if bucket == "real" else np.stack([synthetic_frame(t, size, driving) for t in range(length)]),
        "face_mask": np.stack([face_mask_of(t, size) for t in range(length)]),
        "fg_mask": np.stack([fg_mask_of(t, size) for t in range(length)]),
        "gaze": np.zeros((length, 2), np.float32),
    }  # fmt: skip


def write_synthetic_shards(
    out_dir: str | Path,
    samples: int = 6,
    shards: int = 2,
    frames: int = 40,
    size: int = 64,
    lengths: list[int] | None = None,
    buckets: tuple[str, ...] = ("real", "swap", "style"),
    split: str | None = None,
    first: int = 0,
) -> Path:
    """Write `samples` clips into `shards` committed shards under out_dir/shards; returns that folder.

    Sample i is in bucket buckets[i % len(buckets)] and has lengths[i] frames (default: frames - 2,
    frames, frames + 2 in turn). Use it as DataConfig(root=str(out_dir)) or DataConfig(shards=str(folder)).
    split: written into the new shards' stats as the shard builder does (None: no split, as before
    splits existed); first: the clip number of sample 0, so several calls can fill one folder.
    """
    if size % 16:
        raise ValueError(f"size must be a multiple of 16 (8 cells, even H.264 sizes), got {size}")
    lengths = lengths or [frames + 2 * (i % 3) - 2 for i in range(samples)]
    if len(lengths) != samples:
        raise ValueError(f"{samples} samples but {len(lengths)} lengths")
    folder = Path(out_dir) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        encode_members(_row(first + i, buckets[i % len(buckets)], lengths[i], size), size, EncodeSettings())
        for i in range(samples)
    ]
    before = set(folder.glob("*" + STATS_SUFFIX))
    for part in range(shards):
        write_shard(rows[part::shards], folder)
    if split is not None:
        for stats in set(folder.glob("*" + STATS_SUFFIX)) - before:
            stats.write_text(json.dumps({**json.loads(stats.read_text()), "split": split}))
    return folder
