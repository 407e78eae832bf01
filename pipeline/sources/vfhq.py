"""VFHQ reader: the meta files and frames as VFHQ's own scripts leave them, found under ROOT.

Meta file `Clip+<ytid>+P<pid>+C<idx>+F<start>-<end>.txt` (in `meta_info/`, its `VFHQ-Train/` /
`VFHQ-Test/` subfolders, or inside `meta_info.zip`): header lines `Video: <ytid>`, `H: <h>`, `W: <w>`,
`FPS: <fps>` (the value is the last token), a column-title line, then one row per frame
`frame_index pid x0 y0 w h` + five landmark (x, y) pairs in source pixels, keyed by the ABSOLUTE frame
index (rows run start..end-1 or start+1..end-1, depending on the file), and a last line
`CROP: x0 y0 x1 y1` (or `CROP x0 ...`).

Frames: the official extraction writes `<ytid>/<clip name>/00000001.png ...` (file k is absolute frame
start+k, cropped to the CROP box); other layouts are `<clip name>/`, `<clip name>.zip` and multi-clip zips
(`group<N>.zip` holding `<clip name>/<frame>`), cropped or full frames. Rows are matched to frames by
absolute index, never by position or count.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.config import VfhqConfig
from pipeline.sources.base import ClipFailure, ClipRecord, ScanResult, SourceError, resolve_under
from pipeline.video import (
    IMAGE_SUFFIXES,
    MAX_FRAME_PIXELS,
    image_header_size,
    list_frame_files,
    zip_frame_names,
)

log = logging.getLogger(__name__)

CLIP_NAME = re.compile(r"^Clip\+(?P<ytid>.+)\+P(?P<pid>\d+)\+C(?P<idx>\d+)\+F(?P<start>\d+)-(?P<end>\d+)$")
MIN_ROW_NUMBERS = 6  # frame, person, box (4); the five landmarks follow
TRAILING_NUMBER = re.compile(r"(\d+)$")
META_ZIP = re.compile(r"^meta.*\.zip$", re.IGNORECASE)


class MetaError(ValueError):
    """A meta file that does not follow the format; the message says where."""


@dataclass
class VfhqMeta:
    ytid: str
    person: int
    start: int  # F<start>-<end> of the file name (absolute source frame indices)
    end: int
    fps: float
    width: int  # the source video's frame size
    height: int
    boxes: dict[int, list[float]]  # absolute frame index -> x0, y0, x1, y1 in source pixels
    crop: tuple[float, float, float, float]


def _header_value(header: dict[str, str], key: str) -> str:
    return header[key].split()[-1]


def _frame_rows(lines: list[tuple[int, str]], width: int, height: int) -> dict[int, list[float]]:
    """(line number, text) of the frame rows -> absolute index -> box; only the first six numbers of a
    row are read (the landmarks are not used), all at once: VFHQ has millions of rows."""
    parts = [text.split(None, MIN_ROW_NUMBERS)[:MIN_ROW_NUMBERS] for _, text in lines]
    short = next(
        (number for (number, _), p in zip(lines, parts, strict=True) if len(p) < MIN_ROW_NUMBERS), None
    )
    if short is not None:
        raise MetaError(f"line {short}: a frame row needs at least {MIN_ROW_NUMBERS} numbers")
    try:
        table = np.asarray(parts, dtype=np.float64)
    except ValueError as exc:
        raise MetaError(f"a frame row holds a non-number: {exc}") from exc
    x0, y0, w, h = table[:, 2], table[:, 3], table[:, 4], table[:, 5]
    empty = np.flatnonzero((w <= 0) | (h <= 0))
    if len(empty):
        raise MetaError(f"line {lines[empty[0]][0]}: empty face box {w[empty[0]]:g}x{h[empty[0]]:g}")
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    outside = np.flatnonzero(
        (boxes[:, 0] >= width) | (boxes[:, 1] >= height) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    )
    if len(outside):
        first = outside[0]
        raise MetaError(
            f"frame {int(table[first, 0])}: face box {boxes[first].tolist()} lies outside the {width}x{height} frame"
        )
    return dict(zip(table[:, 0].astype(np.int64).tolist(), boxes.tolist(), strict=True))


def parse_meta(text: str, name: str) -> VfhqMeta:
    """Parse and check one meta file's text (`name`: the clip name); raises MetaError naming the problem."""
    match = CLIP_NAME.match(name)
    if not match:
        raise MetaError(f"file name {name!r} is not Clip+<ytid>+P<pid>+C<idx>+F<start>-<end>.txt")
    start, end = int(match["start"]), int(match["end"])
    if end <= start:
        raise MetaError(f"frame range F{start}-{end} is empty (end <= start)")
    header: dict[str, str] = {}
    rows: list[tuple[int, str]] = []
    crop: tuple[float, float, float, float] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line[:1].isdigit():  # the bulk of the file: checked in _frame_rows
            if crop is not None:
                raise MetaError(f"line {number}: content after the CROP line")
            rows.append((number, line))
            continue
        text_line = line.strip()
        if not text_line:
            continue
        if crop is not None:
            raise MetaError(f"line {number}: content after the CROP line")
        first = text_line.split(maxsplit=1)[0]
        if first.upper().startswith("CROP"):
            values = text_line[4:].lstrip(":").split()
            if len(values) != 4:
                raise MetaError(f"line {number}: CROP needs 4 numbers, got {text_line!r}")
            try:
                x0, y0, x1, y1 = (float(v) for v in values)
            except ValueError as exc:
                raise MetaError(f"line {number}: {exc}") from exc
            crop = (x0, y0, x1, y1)
        elif first.isdigit():
            rows.append((number, text_line))
        elif ":" in text_line and not rows:
            key, _, value = text_line.partition(":")
            header[key.strip().upper()] = value.strip()
        elif rows:
            raise MetaError(f"line {number}: unexpected text {text_line[:40]!r}")
        # else: the column-title line between the header and the rows
    missing = [k for k in ("H", "W", "FPS") if not header.get(k)]
    if missing:
        raise MetaError(f"header lacks {missing}")
    try:
        fps = float(_header_value(header, "FPS"))
        width, height = int(float(_header_value(header, "W"))), int(float(_header_value(header, "H")))
    except ValueError as exc:
        raise MetaError(f"header value: {exc}") from exc
    if fps <= 0 or width <= 0 or height <= 0:
        raise MetaError(f"header values must be positive: W {width}, H {height}, FPS {fps}")
    if crop is None:
        raise MetaError(f"no CROP line (file truncated after {len(rows)} frame rows?)")
    if not rows:
        raise MetaError("no frame rows")
    if not _intersects(crop, width, height):
        raise MetaError(f"CROP {crop} lies outside the {width}x{height} frame")
    boxes = _frame_rows(rows, width, height)
    return VfhqMeta(match["ytid"], int(match["pid"]), start, end, fps, width, height, boxes, crop)


def _intersects(box: tuple[float, ...] | list[float], width: int, height: int) -> bool:
    x0, y0, x1, y1 = box
    return x1 > x0 and y1 > y0 and x0 < width and y0 < height and x1 > 0 and y1 > 0


def split_of_path(parts: tuple[str, ...]) -> str | None:
    """VFHQ's split folders (`VFHQ-Train`, `VFHQ-Test`, any case) among the folder names of a path."""
    for part in reversed(parts):
        lowered = part.lower()
        if re.search(r"(^|[^a-z])test([^a-z]|$)", lowered):
            return "test"
        if re.search(r"(^|[^a-z])train([^a-z]|$)", lowered):
            return "train"
    return None


# ---------------------------------------------------------------------------------------------------
# Finding files: one walk of the dataset folder


@dataclass
class MetaFile:
    name: str  # the clip name
    where: str  # the file, or zip:member, for messages
    split_hint: str | None
    zip_path: Path | None = None  # the meta zip holding it, else None (a plain file at `where`)

    def read_text(self, archive: zipfile.ZipFile | None = None) -> str:
        if self.zip_path is None:
            return Path(self.where).read_text(errors="replace")
        assert archive is not None
        return archive.read(self.where.split(":", 1)[1]).decode(errors="replace")


@dataclass
class FrameSource:
    kind: str  # "frames" (a folder) | "zip"
    path: Path
    prefix: str = ""  # the clip's folder inside a zip
    names: list[str] = field(default_factory=list)  # a zip's frame entries, in read order


@dataclass
class Found:
    meta: dict[str, MetaFile] = field(default_factory=dict)
    frames: dict[str, FrameSource] = field(default_factory=dict)
    meta_zips: list[Path] = field(default_factory=list)
    folders: int = 0
    txt_files: dict[str, int] = field(default_factory=dict)  # folder -> .txt count (for messages)
    zips: int = 0


def _walk(top: Path, depth: int) -> Iterator[tuple[Path, list[os.DirEntry], list[os.DirEntry]]]:
    """(folder, subfolders, files) down to `depth` levels, not entering clip frame folders."""
    try:
        entries = list(os.scandir(top))
    except OSError as exc:
        log.warning("cannot list %s: %s", top, exc)
        return
    folders = [e for e in entries if e.is_dir()]
    files = [e for e in entries if e.is_file()]
    yield top, folders, files
    if depth <= 0:
        return
    for entry in sorted(folders, key=lambda e: e.name):
        if not CLIP_NAME.match(entry.name):
            yield from _walk(Path(entry.path), depth - 1)


def _add_meta(found: Found, meta: MetaFile) -> None:
    if meta.name in found.meta:
        if found.meta[meta.name].where == meta.where:
            return  # the same file, reached again by a second walk
        log.warning("%s: a second meta file for this clip (%s); keeping the first", meta.where, meta.name)
        return
    found.meta[meta.name] = meta


def _add_frames(found: Found, name: str, source: FrameSource) -> None:
    if name in found.frames:
        log.warning(
            "frames of %s found twice (%s and %s); keeping the first",
            name,
            found.frames[name].path,
            source.path,
        )
        return
    found.frames[name] = source


def _scan_meta_zip(found: Found, path: Path) -> None:
    found.meta_zips.append(path)
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            pure = PurePosixPath(member)
            if pure.suffix.lower() == ".txt" and CLIP_NAME.match(pure.stem):
                hint = split_of_path((path.stem, *pure.parts[:-1]))
                _add_meta(found, MetaFile(pure.stem, f"{path}:{member}", hint, zip_path=path))


def _scan_frame_zip(found: Found, path: Path) -> None:
    """A zip of one clip's frames (`<clip>.zip`) or of several (`<clip>/<frame>` entries)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    prefixes: dict[str, str] = {}
    for member in names:
        pure = PurePosixPath(member)
        if pure.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        folder = pure.parent
        clip = next((p for p in reversed(folder.parts) if CLIP_NAME.match(p)), None)
        if clip is None and folder.parts == () and CLIP_NAME.match(path.stem):
            clip = path.stem
        if clip is not None:
            prefixes.setdefault(clip, "" if folder.parts == () else f"{folder.as_posix()}/")
    for clip, prefix in prefixes.items():
        _add_frames(found, clip, FrameSource("zip", path, prefix, zip_frame_names(names, prefix)))


def find_files(root: Path, meta_root: Path | None, frames_root: Path, depth: int) -> Found:
    """Meta files and frame sources under the dataset folders (one walk when they are the same)."""
    found = Found()
    roots = [frames_root] if meta_root is None else [meta_root, frames_root]
    if meta_root is not None and meta_root.is_file():
        _scan_meta_zip(found, meta_root)
        roots = [frames_root]
    seen: set[Path] = set()
    for top in roots:
        top = top.resolve()
        if top in seen:
            continue
        seen.add(top)
        for folder, subfolders, files in _walk(top, depth):
            found.folders += 1
            txt = [f for f in files if f.name.lower().endswith(".txt")]
            if txt:
                found.txt_files[str(folder.relative_to(top)) if folder != top else "."] = len(txt)
            for entry in txt:
                stem = entry.name[: -len(".txt")]
                if CLIP_NAME.match(stem) and (
                    meta_root is None or folder.is_relative_to(meta_root.resolve())
                ):
                    hint = split_of_path(folder.relative_to(top).parts)
                    _add_meta(found, MetaFile(stem, entry.path, hint))
            for entry in files:
                if not entry.name.lower().endswith(".zip"):
                    continue
                found.zips += 1
                path = Path(entry.path)
                try:
                    if META_ZIP.match(entry.name) and meta_root is None:
                        _scan_meta_zip(found, path)
                    elif not META_ZIP.match(entry.name):
                        _scan_frame_zip(found, path)
                except (OSError, zipfile.BadZipFile) as exc:
                    log.warning("cannot read %s: %s", path, exc)
            for entry in subfolders:
                if CLIP_NAME.match(entry.name):
                    _add_frames(found, entry.name, FrameSource("frames", Path(entry.path)))
    return found


def _nothing_found_message(root: Path, found: Found, depth: int) -> str:
    where = ", ".join(f"{k} ({v})" for k, v in sorted(found.txt_files.items(), key=lambda kv: -kv[1])[:5])
    txt_total = sum(found.txt_files.values())
    return (
        f"no VFHQ meta files (Clip+<ytid>+P<pid>+C<idx>+F<start>-<end>.txt, in folders or meta_info*.zip) "
        f"under {root} (searched {depth} folder levels): found {found.folders} folders, "
        f"{txt_total} other .txt files{' in ' + where if where else ''}, {found.zips} zips, "
        f"{len(found.frames)} clip frame folders/zips. Point ROOT at the VFHQ download, or set vfhq.meta_dir."
    )


# ---------------------------------------------------------------------------------------------------
# Matching frames to meta rows


def _frame_names(source: FrameSource) -> list[str]:
    if source.kind == "zip":
        return source.names
    return [p.name for p in list_frame_files(source.path)]


def _first_frame_size(
    source: FrameSource, names: list[str], meta: VfhqMeta | None = None, max_pixels: int = MAX_FRAME_PIXELS
) -> tuple[int, int]:
    """The size the clip's first frame declares in its header (nothing is decoded). A frame is at most
    the source frame its meta file describes (a cropped one is smaller) and at most `max_pixels`;
    a larger one is refused as unreadable (an OSError: the scan makes it a failure row)."""
    where = f"{source.path}:{names[0]}" if source.kind == "zip" else str(source.path / names[0])
    try:
        if source.kind == "zip":
            with zipfile.ZipFile(source.path) as archive, archive.open(names[0]) as handle:
                width, height = image_header_size(handle, where)
        else:
            with open(source.path / names[0], "rb") as handle:
                width, height = image_header_size(handle, where)
    except ValueError as exc:
        raise OSError(str(exc)) from exc
    declared = f"{where}: declares {width}x{height} ({width * height:,} pixels)"
    if meta is not None and width * height > meta.width * meta.height:
        raise OSError(f"{declared}, more than the {meta.width}x{meta.height} source frame of its meta file")
    if width * height > max_pixels:
        raise OSError(f"{declared}, over max_frame_pixels {max_pixels:,}")
    if width <= 0 or height <= 0:
        raise OSError(f"{declared}: an empty image")
    return width, height


def absolute_indices(names: list[str], start: int) -> list[int]:
    """The absolute source frame index of each frame file.

    Files numbered relative to the clip (the official extraction's 00000001.png is frame start+1; a
    0-based 00000000.png is frame start) give start + n either way; files numbered by absolute index
    (all numbers >= start > 0) are taken as they are. Names without a number count from start+1.
    """
    numbers = []
    for name in names:
        found = TRAILING_NUMBER.search(PurePosixPath(name).stem)
        if found is None:
            return [start + 1 + position for position in range(len(names))]
        numbers.append(int(found.group(1)))
    if start > 0 and numbers and min(numbers) >= start:
        return numbers
    return [start + n for n in numbers]


def matched_run(indices: list[int], rows: dict[int, list[float]]) -> tuple[int, int]:
    """(first position, length) of the longest run of consecutive frames that all have a meta row."""
    best_first, best_length = 0, 0
    first, length = 0, 0
    for position, index in enumerate(indices):
        if index not in rows:
            length = 0
            continue
        if length and index == indices[position - 1] + 1:
            length += 1
        else:
            first, length = position, 1
        if length > best_length:
            best_first, best_length = first, length
    return best_first, best_length


def boxes_in_frame_pixels(
    meta: VfhqMeta, boxes: list[list[float]], frame_size: tuple[int, int]
) -> list[list[float]]:
    """Source-pixel boxes moved into the frames' pixels: as they are for full frames, shifted (and
    scaled, for resized crops) into the CROP box for cropped frames."""
    width, height = frame_size
    if (width, height) == (meta.width, meta.height):
        return boxes
    cx0, cy0, cx1, cy1 = meta.crop
    sx, sy = width / (cx1 - cx0), height / (cy1 - cy0)
    if abs(sx / sy - 1) > 0.05:
        raise MetaError(
            f"frames are {width}x{height}: neither the source size {meta.width}x{meta.height} nor the "
            f"CROP box {cx1 - cx0:g}x{cy1 - cy0:g} (at any scale)"
        )
    return [[(x0 - cx0) * sx, (y0 - cy0) * sy, (x1 - cx0) * sx, (y1 - cy0) * sy] for x0, y0, x1, y1 in boxes]


def clip_record(name: str, meta: VfhqMeta, source: FrameSource, dataset: str, hint: str | None) -> ClipRecord:
    """The clip's record: its longest run of frames with meta rows, boxes in the frames' pixels."""
    names = _frame_names(source)
    if not names:
        raise FileNotFoundError(
            f"{source.path}{':' + source.prefix if source.prefix else ''} holds no frames"
        )
    indices = absolute_indices(names, meta.start)
    first, count = matched_run(indices, meta.boxes)
    if count == 0:
        raise MetaError(
            f"no frame has a meta row: frames are absolute {indices[0]}..{indices[-1]}, rows "
            f"{min(meta.boxes)}..{max(meta.boxes)}"
        )
    if count < len(names):
        log.info("%s: %d of %d frames have meta rows and are used", name, count, len(names))
    size = _first_frame_size(source, names[first:], meta)
    boxes = [meta.boxes[i] for i in indices[first : first + count]]
    return ClipRecord(
        clip_id=name,
        dataset=dataset,
        identity=f"{meta.ytid}+P{meta.person}",
        source=str(source.path),
        source_kind=source.kind,
        fps=meta.fps,
        num_frames=count,
        width=size[0],
        height=size[1],
        face_boxes=boxes_in_frame_pixels(meta, boxes, size),
        frame_offset=first,
        member_prefix=source.prefix,
        split_hint=hint,
    )


def scan_vfhq(root: Path, config: VfhqConfig, dataset: str = "vfhq") -> ScanResult:
    """One ClipRecord per usable clip, one ClipFailure per clip that is not."""
    meta_root = resolve_under(root, config.meta_dir) if config.meta_dir else None
    frames_root = resolve_under(root, config.frames_dir) if config.frames_dir else root
    for path, key in ((meta_root, "meta_dir"), (frames_root, "frames_dir")):
        if path is not None and not path.exists():
            raise SourceError(f"VFHQ {key} {path} does not exist (vfhq.{key})")
    found = find_files(root, meta_root, frames_root, config.search_depth)
    if not found.meta:
        raise SourceError(_nothing_found_message(meta_root or root, found, config.search_depth))
    result = ScanResult([], [], searched=[f"VFHQ meta files: {len(found.meta)} under {meta_root or root}"])
    archives = {path: zipfile.ZipFile(path) for path in found.meta_zips}
    matched: list[tuple[str, VfhqMeta, FrameSource, MetaFile]] = []
    try:
        for name in sorted(found.meta):
            meta_file = found.meta[name]
            try:
                meta = parse_meta(meta_file.read_text(archives.get(meta_file.zip_path)), name)
            except (MetaError, OSError, UnicodeError, KeyError) as exc:
                result.failures.append(
                    ClipFailure(name, dataset, "source", "malformed_meta", f"{meta_file.where}: {exc}")
                )
                continue
            source = found.frames.get(name)
            if source is None:
                msg = f"no frames of {name} under {frames_root} (<ytid>/<clip>/, <clip>/, <clip>.zip or in a zip)"
                result.failures.append(ClipFailure(name, dataset, "source", "missing_frames", msg))
                continue
            matched.append((name, meta, source, meta_file))
    finally:
        for archive in archives.values():
            archive.close()

    def record_or_failure(item: tuple[str, VfhqMeta, FrameSource, MetaFile]) -> ClipRecord | ClipFailure:
        name, meta, source, meta_file = item
        try:
            return clip_record(name, meta, source, dataset, meta_file.split_hint)
        except FileNotFoundError as exc:
            return ClipFailure(name, dataset, "source", "missing_frames", str(exc))
        except MetaError as exc:
            return ClipFailure(name, dataset, "source", "malformed_meta", f"{meta_file.where}: {exc}")
        except (OSError, zipfile.BadZipFile) as exc:
            return ClipFailure(name, dataset, "source", "unreadable_frames", f"{name}: {exc}")

    # Listing each clip's frames and reading its first image header waits on the file system: threads.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for outcome in pool.map(record_or_failure, matched):
            (result.records if isinstance(outcome, ClipRecord) else result.failures).append(outcome)
    for name in sorted(set(found.frames) - set(found.meta)):
        msg = f"frames {found.frames[name].path} have no meta file Clip+...txt for {name}"
        result.failures.append(ClipFailure(name, dataset, "source", "missing_meta", msg))
    return result
