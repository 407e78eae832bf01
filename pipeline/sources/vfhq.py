"""VFHQ reader: one meta txt per clip, frames as PNG folders or zips of them.

Meta file `Clip+<ytid>+P<pid>+C<idx>+F<start>-<end>.txt`: `Key: value` header lines (Video, H, W,
FPS, ...), one row per frame `frame_idx person_id x0 y0 w h` followed by five (x, y) landmarks, and a
last line `CROP x0 y0 x1 y1`. Frames live in `<frames_dir>/<clip name>/` or `<clip name>.zip`.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.config import VfhqConfig
from pipeline.sources.base import ClipFailure, ClipRecord, ScanResult, SourceError
from pipeline.video import IMAGE_SUFFIXES, list_frame_files

log = logging.getLogger(__name__)

CLIP_NAME = re.compile(r"^Clip\+(?P<ytid>.+)\+P(?P<pid>\d+)\+C(?P<idx>\d+)\+F(?P<start>\d+)-(?P<end>\d+)$")
ROW_NUMBERS = 6 + 10  # frame, person, box (4), five landmarks (10)


class MetaError(ValueError):
    """A meta file that does not follow the format; the message says where."""


@dataclass
class VfhqMeta:
    ytid: str
    person: int
    fps: float
    width: int
    height: int
    boxes: list[list[float]]  # x0, y0, x1, y1 per frame
    crop: tuple[float, float, float, float]


def parse_meta(path: Path) -> VfhqMeta:
    """Parse and check one meta file; raises MetaError naming the first problem."""
    match = CLIP_NAME.match(path.stem)
    if not match:
        raise MetaError(f"file name {path.name!r} is not Clip+<ytid>+P<pid>+C<idx>+F<start>-<end>.txt")
    expected_rows = int(match["end"]) - int(match["start"])
    header: dict[str, str] = {}
    boxes: list[list[float]] = []
    crop: tuple[float, float, float, float] | None = None
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if crop is not None:
            raise MetaError(f"line {number}: content after the CROP line")
        if text.upper().startswith("CROP"):
            values = text[4:].lstrip(":").split()
            if len(values) != 4:
                raise MetaError(f"line {number}: CROP needs 4 numbers, got {text!r}")
            x0, y0, x1, y1 = (float(v) for v in values)
            crop = (x0, y0, x1, y1)
            continue
        first = text.split()[0]
        if first.lstrip("-").isdigit():
            values = text.split()
            if len(values) != ROW_NUMBERS:
                raise MetaError(
                    f"line {number}: expected {ROW_NUMBERS} numbers per frame row, got {len(values)}"
                )
            try:
                x0, y0, w, h = (float(v) for v in values[2:6])
            except ValueError as exc:
                raise MetaError(f"line {number}: {exc}") from exc
            if w <= 0 or h <= 0:
                raise MetaError(f"line {number}: empty face box {w}x{h}")
            boxes.append([x0, y0, x0 + w, y0 + h])
        elif ":" in text and not boxes:
            key, _, value = text.partition(":")
            header[key.strip().upper()] = value.strip()
        elif not boxes:
            continue  # the column-title line between header and rows
        else:
            raise MetaError(f"line {number}: unexpected text {text[:40]!r}")
    missing = [k for k in ("H", "W", "FPS") if k not in header]
    if missing:
        raise MetaError(f"header lacks {missing}")
    if crop is None:
        raise MetaError(f"no CROP line (file truncated after {len(boxes)} frame rows?)")
    if len(boxes) < expected_rows:
        raise MetaError(
            f"{len(boxes)} frame rows, the name says {expected_rows} (F{match['start']}-{match['end']})"
        )
    try:
        fps, width, height = float(header["FPS"]), int(header["W"]), int(header["H"])
    except ValueError as exc:
        raise MetaError(f"header value: {exc}") from exc
    return VfhqMeta(match["ytid"], int(match["pid"]), fps, width, height, boxes, crop)


def _frame_source(frames_root: Path, name: str) -> tuple[Path, str, int, tuple[int, int]]:
    """The frame folder or zip of a clip, its kind, its frame count and the first frame's (w, h)."""
    folder, archive = frames_root / name, frames_root / f"{name}.zip"
    if folder.is_dir():
        files = list_frame_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder} holds no frames")
        with Image.open(files[0]) as image:
            return folder, "frames", len(files), image.size
    if archive.is_file():
        with zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
            if not names:
                raise FileNotFoundError(f"{archive} holds no frames")
            with zf.open(names[0]) as handle, Image.open(handle) as image:
                return archive, "zip", len(names), image.size
    raise FileNotFoundError(f"no frame folder {folder} or zip {archive}")


def scan_vfhq(root: Path, config: VfhqConfig, dataset: str = "vfhq") -> ScanResult:
    """One ClipRecord per usable clip, one ClipFailure per clip that is not."""
    meta_root, frames_root = root / config.meta_dir, root / config.frames_dir
    if not meta_root.is_dir():
        raise SourceError(f"VFHQ meta folder {meta_root} does not exist (set vfhq.meta_dir)")
    result = ScanResult([], [])
    meta_names = set()
    for meta_path in sorted(meta_root.glob("*.txt")):
        name = meta_path.stem
        meta_names.add(name)
        try:
            meta = parse_meta(meta_path)
        except (MetaError, OSError, UnicodeError) as exc:
            result.failures.append(
                ClipFailure(name, dataset, "source", "malformed_meta", f"{meta_path}: {exc}")
            )
            continue
        try:
            source, kind, count, (width, height) = _frame_source(frames_root, name)
        except FileNotFoundError as exc:
            result.failures.append(ClipFailure(name, dataset, "source", "missing_frames", str(exc)))
            continue
        except (OSError, zipfile.BadZipFile) as exc:
            result.failures.append(
                ClipFailure(name, dataset, "source", "unreadable_frames", f"{name}: {exc}")
            )
            continue
        num_frames = min(count, len(meta.boxes))
        if count != len(meta.boxes):
            log.warning(
                "%s: %d frames on disk, %d meta rows; using %d", name, count, len(meta.boxes), num_frames
            )
        boxes: list[list[float]] | None = meta.boxes[:num_frames]
        if (width, height) != (meta.width, meta.height):
            # Frames already cropped by the VFHQ processing script: the boxes no longer apply.
            boxes = None
        result.records.append(
            ClipRecord(
                clip_id=name,
                dataset=dataset,
                identity=f"{meta.ytid}+P{meta.person}",
                source=str(source),
                source_kind=kind,
                fps=meta.fps,
                num_frames=num_frames,
                width=width,
                height=height,
                face_boxes=boxes,
            )
        )
    if frames_root.is_dir():
        for entry in sorted(frames_root.iterdir()):
            name = entry.stem if entry.suffix == ".zip" else entry.name
            if name not in meta_names and (entry.is_dir() or entry.suffix == ".zip"):
                msg = f"frames {entry} have no meta file {meta_root / (name + '.txt')}"
                result.failures.append(ClipFailure(name, dataset, "source", "missing_meta", msg))
    return result
