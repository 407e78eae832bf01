"""What every dataset reader yields: clip records, plus one failure record per clip it cannot use."""

from __future__ import annotations

from dataclasses import dataclass


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
    width: int  # the frame size the face boxes refer to
    height: int
    # Per-frame face boxes (x0, y0, x1, y1) in source pixels; None when the clip is already a face
    # crop (processed CelebV-HQ), in which case the whole frame is used.
    face_boxes: list[list[float]] | None = None


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

    def extend(self, other: ScanResult) -> None:
        self.records.extend(other.records)
        self.failures.extend(other.failures)
