"""What every dataset reader yields: clip records, plus one failure record per clip it cannot use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def resolve_under(root: Path, path: str) -> Path:
    """A configured folder or file: absolute as given, else relative to the dataset root."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


class SourceError(RuntimeError):
    """The dataset as a whole cannot be read (a missing root or index file): nothing to skip to."""


@dataclass
class ClipRecord:
    clip_id: str
    dataset: str
    identity: str
    source: str  # a video file, a frame folder or a zip of frames
    source_kind: str  # "video" | "frames" | "zip"
    fps: float
    num_frames: int
    width: int  # the size of the source's frames (what face_boxes and crop_box refer to)
    height: int
    # Per-frame face boxes (x0, y0, x1, y1) in the source's frame pixels; None when the dataset gives
    # none (processed CelebV-HQ: the clip is already the face crop, so the centre square is used).
    face_boxes: list[list[float]] | None = None
    frame_offset: int = 0  # the clip's first frame within the source (video frame or sorted image)
    member_prefix: str = ""  # zips holding several clips: the folder of this clip's frames in the zip
    crop_box: list[int] | None = None  # a fixed crop (x0, y0, x1, y1) the dataset defines (raw CelebV-HQ)
    split_hint: str | None = None  # the dataset's own split of this clip (VFHQ-Train / VFHQ-Test)
    labels: dict[str, list[str]] | None = None  # attribute name lists (CelebV-HQ appearance, action, emotion)


@dataclass
class ClipFailure:
    clip_id: str
    dataset: str
    stage: str
    error: str  # a short reason code: missing_frames, malformed_meta, unreadable_video, ...
    message: str


@dataclass
class ScanResult:
    records: list[ClipRecord]
    failures: list[ClipFailure]
    # What the reader looked for and found, for the error when no clip is usable.
    searched: list[str] = field(default_factory=list)
    # Tolerated oddities, by name -> number of clips (e.g. duplicate_meta_rows): logged once per clip,
    # counted here so the build's summary shows them.
    counters: dict[str, int] = field(default_factory=dict)

    def extend(self, other: ScanResult) -> None:
        self.records.extend(other.records)
        self.failures.extend(other.failures)
        self.searched.extend(other.searched)
        for name, count in other.counters.items():
            self.count(name, count)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
