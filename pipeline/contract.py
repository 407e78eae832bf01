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
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

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


class MemberMismatch(ValueError):
    """A member whose header disagrees with its sample's json or with itself, found before its data is read."""


MASK_BITS, MASK_SHAPE = "bits.npy", "shape.npy"  # the arrays inside a face.npz / fg.npz
SMALL_ARRAY_BYTES = 4096  # a .npy of a few numbers (a mask's shape) is far smaller
GAZE_DTYPE = np.dtype("<f4")


def read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header; leaves `handle` at the array's first byte. Reads no data."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise MemberMismatch(f".npy format version {version}, expected 1.0 or 2.0")
    if fortran or dtype.hasobject:
        raise MemberMismatch(f".npy array of dtype {dtype} (fortran order {fortran}), expected plain C order")
    return tuple(int(v) for v in shape), dtype


def _zip_member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(name)
    except KeyError:
        raise MemberMismatch(f"no {name} in the npz (holds {archive.namelist()})") from None


def _mask_shape(archive: zipfile.ZipFile) -> tuple[int, int, int]:
    """The [T,H,W] a mask npz declares, read from its small shape array after checking its declared size."""
    info = _zip_member(archive, MASK_SHAPE)
    if info.file_size > SMALL_ARRAY_BYTES:
        raise MemberMismatch(
            f"{MASK_SHAPE} declares {info.file_size} bytes, expected under {SMALL_ARRAY_BYTES}"
        )
    with archive.open(info) as handle:
        shape, dtype = read_npy_header(handle)
        if shape != (3,) or dtype.kind not in "iu":
            raise MemberMismatch(f"{MASK_SHAPE} is {dtype} {shape}, expected 3 integers [T,H,W]")
        values = np.frombuffer(handle.read(3 * dtype.itemsize), dtype)
    if len(values) != 3 or (values < 1).any():
        raise MemberMismatch(f"{MASK_SHAPE} holds {values.tolist()}, expected 3 positive integers [T,H,W]")
    num_frames, height, width = (int(v) for v in values)
    return num_frames, height, width


def _open_mask_bits(archive: zipfile.ZipFile, shape: tuple[int, int, int]) -> IO[bytes]:
    """The bits array of a [T,H,W] mask, opened at its first byte once its .npy header and the zip's
    declared size both say exactly ceil(T*H*W / 8) bytes: the data is never read past that."""
    num_frames, height, width = shape
    expected = (num_frames * height * width + 7) // 8
    info = _zip_member(archive, MASK_BITS)
    handle = archive.open(info)
    try:
        bits_shape, dtype = read_npy_header(handle)
        if bits_shape != (expected,) or dtype != np.uint8:
            raise MemberMismatch(
                f"{MASK_BITS} is {dtype} {bits_shape}, a {list(shape)} mask packs into uint8 ({expected},)"
            )
        if info.file_size != handle.tell() + expected:
            raise MemberMismatch(
                f"{MASK_BITS} declares {info.file_size} bytes, its header and {expected} bytes of bits "
                f"make {handle.tell() + expected}"
            )
    except BaseException:
        handle.close()
        raise
    return handle


def check_mask_header(data: bytes, expected_shape: Sequence[int]) -> None:
    """Raise MemberMismatch unless a face.npz / fg.npz declares `expected_shape` [T,H,W] and exactly
    the bytes that shape packs into. Reads the headers only: a bomb is refused before it is inflated."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        shape = _mask_shape(archive)
        if shape != tuple(int(v) for v in expected_shape):
            raise MemberMismatch(f"mask declares {list(shape)}, expected {list(expected_shape)}")
        _open_mask_bits(archive, shape).close()


def decode_mask_frames(data: bytes, indices: Sequence[int]) -> np.ndarray:
    """bool (len(indices), H, W): only the asked frames of a face.npz / fg.npz member are inflated.

    The bits are one flat packbits array of the [T,H,W] mask, so frame t is bits [t*H*W, (t+1)*H*W);
    the member is read as a stream up to the last asked frame, so memory stays that of the frames asked.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        shape = _mask_shape(archive)
        num_frames, height, width = shape
        for t in indices:
            if not 0 <= int(t) < num_frames:
                raise ValueError(f"mask frame {int(t)} outside a mask of {num_frames} frames")
        frame_bits = height * width
        frames: dict[int, np.ndarray] = {}
        with _open_mask_bits(archive, shape) as handle:
            start = handle.tell()
            for t in sorted({int(t) for t in indices}):  # forward only: a zip member inflates as a stream
                first, stop = t * frame_bits, (t + 1) * frame_bits
                handle.seek(start + first // 8)
                size = (stop + 7) // 8 - first // 8
                chunk = handle.read(size)
                if len(chunk) != size:
                    raise MemberMismatch(f"{MASK_BITS} ends inside frame {t} of a {list(shape)} mask")
                offset = first % 8
                bits = np.unpackbits(np.frombuffer(chunk, np.uint8))[offset : offset + frame_bits]
                frames[t] = bits.astype(bool).reshape(height, width)
    out = np.empty((len(indices), height, width), bool)
    for row, t in enumerate(indices):
        out[row] = frames[int(t)]
    return out


def check_gaze_header(data: bytes, num_frames: int) -> None:
    """Raise MemberMismatch unless a gaze.npy declares float32 [num_frames, 2] and holds exactly that."""
    handle = io.BytesIO(data)
    shape, dtype = read_npy_header(handle)
    if shape != (num_frames, 2) or dtype != GAZE_DTYPE:
        raise MemberMismatch(f"gaze declares {dtype} {list(shape)}, expected float32 [{num_frames}, 2]")
    if len(data) != handle.tell() + num_frames * 2 * GAZE_DTYPE.itemsize:
        raise MemberMismatch(
            f"gaze holds {len(data)} bytes, a float32 [{num_frames}, 2] array takes "
            f"{handle.tell() + num_frames * 2 * GAZE_DTYPE.itemsize}"
        )
