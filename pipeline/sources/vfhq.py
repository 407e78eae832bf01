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
import math
import os
import re
import struct
import zipfile
import zlib
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
FPS_RANGE = (1.0, 240.0)  # frame rates a real video has; outside it the header is damaged
MAX_SIDE = 16384  # pixels: W / H beyond it are damage, not video
# Compression methods zipfile decodes (stored, deflate, bzip2, lzma); anything else cannot be read.
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
AES_METHOD = 99  # WinZip AES (7-Zip's "zip AES"): needs a password and a decoder zipfile lacks
# Errors a damaged zip member raises while zipfile opens or reads it.
ZIP_READ_ERRORS = (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError, ValueError)


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
    duplicate_rows: int = 0  # frame indices with more than one row (the last row is kept)


def _header_value(header: dict[str, str], key: str) -> str:
    return header[key].split()[-1]


def _frame_rows(lines: list[tuple[int, str]], width: int, height: int) -> tuple[dict[int, list[float]], int]:
    """(line number, text) of the frame rows -> (absolute index -> box, indices given twice or more);
    only the first six numbers of a row are read (the landmarks are not used), all at once: VFHQ has
    millions of rows."""
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
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if len(bad):
        raise MetaError(f"line {lines[bad[0]][0]}: a frame row holds NaN or infinity")
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
    indices = table[:, 0].astype(np.int64)
    duplicates = len(indices) - len(np.unique(indices))
    return dict(zip(indices.tolist(), boxes.tolist(), strict=True)), duplicates


def _header_number(header: dict[str, str], numbers: dict[str, int], key: str) -> float:
    try:
        value = float(_header_value(header, key))
    except ValueError as exc:
        raise MetaError(f"line {numbers[key]}: {key} {header[key]!r} is not a number") from exc
    return value


def _header_values(header: dict[str, str], numbers: dict[str, int]) -> tuple[float, int, int]:
    """FPS, W, H of the header, each finite and in a range a real video has."""
    fps = _header_number(header, numbers, "FPS")
    low, high = FPS_RANGE
    if not (math.isfinite(fps) and low <= fps <= high):
        raise MetaError(f"line {numbers['FPS']}: FPS {fps:g} is not a frame rate in {low:g}-{high:g}")
    sides = []
    for key in ("W", "H"):
        value = _header_number(header, numbers, key)
        if not (math.isfinite(value) and 1 <= value <= MAX_SIDE):
            raise MetaError(f"line {numbers[key]}: {key} {value:g} is not a frame size in 1-{MAX_SIDE}")
        sides.append(int(value))
    return fps, sides[0], sides[1]


def parse_meta(text: str, name: str) -> VfhqMeta:
    """Parse and check one meta file's text (`name`: the clip name); raises MetaError naming the problem."""
    match = CLIP_NAME.match(name)
    if not match:
        raise MetaError(f"file name {name!r} is not Clip+<ytid>+P<pid>+C<idx>+F<start>-<end>.txt")
    start, end = int(match["start"]), int(match["end"])
    if end <= start:
        raise MetaError(f"frame range F{start}-{end} is empty (end <= start)")
    header: dict[str, str] = {}
    header_lines: dict[str, int] = {}
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
            header_lines[key.strip().upper()] = number
        elif rows:
            raise MetaError(f"line {number}: unexpected text {text_line[:40]!r}")
        # else: the column-title line between the header and the rows
    missing = [k for k in ("H", "W", "FPS") if not header.get(k)]
    if missing:
        raise MetaError(f"header lacks {missing}")
    fps, width, height = _header_values(header, header_lines)
    if crop is None:
        raise MetaError(f"no CROP line (file truncated after {len(rows)} frame rows?)")
    if not rows:
        raise MetaError("no frame rows")
    if not all(math.isfinite(v) for v in crop) or not _intersects(crop, width, height):
        raise MetaError(f"CROP {crop} lies outside the {width}x{height} frame")
    boxes, duplicates = _frame_rows(rows, width, height)
    return VfhqMeta(match["ytid"], int(match["pid"]), start, end, fps, width, height, boxes, crop, duplicates)


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
    member: str = ""  # its name inside zip_path

    def read_text(self, archive: zipfile.ZipFile | None, cap: int) -> str:
        """The file's text, refused (MetaError) past `cap` bytes without reading more than cap + 1."""
        if self.zip_path is None:
            with open(self.where, "rb") as handle:
                _check_size(os.fstat(handle.fileno()).st_size, cap)
                data = handle.read(cap + 1)
        else:
            assert archive is not None
            info = archive.getinfo(self.member)
            _check_size(info.file_size, cap)
            try:  # a lying header can still hide more: the read itself stops at cap + 1
                with archive.open(info) as handle:
                    data = handle.read(cap + 1)
            except ZIP_READ_ERRORS as exc:
                raise MetaError(f"cannot read this zip member: {type(exc).__name__}: {exc}") from exc
        _check_size(len(data), cap)
        return data.decode(errors="replace")


def _check_size(size: int, cap: int) -> None:
    if size > cap:
        raise MetaError(
            f"{size} bytes, over the {cap}-byte cap for a meta file (a damaged or wrong file; the cap is "
            "vfhq.meta_max_bytes)"
        )


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
    # Clips named inside a zip that cannot be used (damaged directory, encrypted or undecodable
    # members): clip -> (failure reason, message naming the zip and the problem).
    broken: dict[str, tuple[str, str]] = field(default_factory=dict)
    bad_zips: list[str] = field(default_factory=list)  # damaged zips that named no clip: "path (why)"


def _kind(entry: os.DirEntry) -> str | None:
    """ "dir", "file" or None (anything else, and links that loop or lead nowhere: skipped with a
    warning; a link pointing to itself raises ELOOP from is_dir)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        if entry.is_symlink():
            log.warning("skipping %s: a symbolic link to nothing (%s)", entry.path, os.readlink(entry.path))
    except OSError as exc:
        log.warning("skipping %s: %s", entry.path, exc)
    return None


def _walk(
    top: Path, depth: int, visited: set[tuple[int, int]] | None = None
) -> Iterator[tuple[Path, list[os.DirEntry], list[os.DirEntry]]]:
    """(folder, subfolders, files) down to `depth` levels, not entering clip frame folders. Links are
    followed (downloads are often linked in from elsewhere), but each real folder is listed once, so a
    link back to an ancestor cannot loop."""
    visited = set() if visited is None else visited
    try:
        status = top.stat()
        if (status.st_dev, status.st_ino) in visited:
            log.warning("skipping %s: a link to a folder already searched", top)
            return
        visited.add((status.st_dev, status.st_ino))
        entries = list(os.scandir(top))
    except OSError as exc:
        log.warning("cannot list %s: %s", top, exc)
        return
    kinds = [(e, _kind(e)) for e in entries]
    folders = [e for e, kind in kinds if kind == "dir"]
    files = [e for e, kind in kinds if kind == "file"]
    yield top, folders, files
    if depth <= 0:
        return
    for entry in sorted(folders, key=lambda e: e.name):
        if not CLIP_NAME.match(entry.name):
            yield from _walk(Path(entry.path), depth - 1, visited)


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


# ---------------------------------------------------------------------------------------------------
# Damaged zips: name the clips they hold, so each becomes a failure row instead of stopping the scan

CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")  # 46 bytes, signature PK\1\2
LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # 30 bytes, signature PK\3\4
END_RECORD = struct.Struct("<4s4H2LH")  # 22 bytes, signature PK\5\6
SALVAGE_LIMIT = 1_000_000  # members read from a damaged zip's headers at most


def _central_names(handle, size: int) -> list[str]:
    """Member names from the central directory, as far as it parses (bad name bytes replaced)."""
    handle.seek(max(0, size - 2**16 - END_RECORD.size))
    tail = handle.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + END_RECORD.size > len(tail):
        return []
    *_, cd_size, cd_offset, _ = END_RECORD.unpack_from(tail, at)
    handle.seek(min(cd_offset, size))
    data = handle.read(min(cd_size, size))
    names, pos = [], 0
    while pos + CENTRAL_HEADER.size <= len(data) and data[pos : pos + 4] == b"PK\x01\x02":
        header = CENTRAL_HEADER.unpack_from(data, pos)
        name_length, extra_length, comment_length = header[10:13]
        start = pos + CENTRAL_HEADER.size
        names.append(data[start : start + name_length].decode("utf-8", "replace"))
        pos = start + name_length + extra_length + comment_length
        if len(names) >= SALVAGE_LIMIT:
            break
    return names


def _local_names(handle) -> list[str]:
    """Member names from the local headers, walked from the start of the file."""
    names, pos = [], 0
    while len(names) < SALVAGE_LIMIT:
        handle.seek(pos)
        head = handle.read(LOCAL_HEADER.size)
        if len(head) < LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            break
        _, _, flags, _, _, _, _, compressed, _, name_length, extra_length = LOCAL_HEADER.unpack(head)
        names.append(handle.read(name_length).decode("utf-8", "replace"))
        if flags & 0x8 and compressed == 0:  # sizes only in a data descriptor after the data
            break
        pos += LOCAL_HEADER.size + name_length + extra_length + compressed
    return names


def salvage_names(path: Path) -> list[str]:
    """What a zip that zipfile refuses names, read leniently from both its directory and its local
    headers (either may be the damaged part); [] when nothing parses."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return list(dict.fromkeys(_central_names(handle, size) + _local_names(handle)))
    except (OSError, struct.error, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return []


def _member_problem(info: zipfile.ZipInfo, directory_start: int) -> str | None:
    """Why zipfile would fail to read this member, seen from the directory alone (no read)."""
    if info.flag_bits & 0x1:
        return "is encrypted" + (" (WinZip AES)" if info.compress_type == AES_METHOD else "")
    if info.compress_type not in READABLE_METHODS:
        return f"uses compression method {info.compress_type}, which cannot be decoded"
    if info.flag_bits & 0x20:
        return "holds compressed patched data, which cannot be decoded"
    if info.header_offset + LOCAL_HEADER.size + info.compress_size > directory_start:
        return "runs past the start of the central directory (damaged offsets or sizes)"
    return None


def _open_failed(found: Found, path: Path, exc: Exception, reason: str, meta: bool) -> None:
    """A zip zipfile cannot open: every clip it can still be seen to name fails; else it is noted."""
    problem = f"{path}: the zip is damaged ({type(exc).__name__}: {exc}); re-download or re-zip it"
    clips = _clip_prefixes(path, salvage_names(path), meta)
    if not clips and not meta and CLIP_NAME.match(path.stem):
        clips = {path.stem: ""}
    for clip in clips:
        found.broken.setdefault(clip, (reason, problem))
    log.warning("%s (%d clips named in it fail)", problem, len(clips))
    if not clips:
        found.bad_zips.append(f"{path} ({type(exc).__name__}: {exc})")


def _scan_meta_zip(found: Found, path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception as exc:  # noqa: BLE001 - any damage: its clips fail, the scan goes on
        _open_failed(found, path, exc, "malformed_meta", meta=True)
        return
    found.meta_zips.append(path)
    for member in names:
        pure = PurePosixPath(member)
        if pure.suffix.lower() == ".txt" and CLIP_NAME.match(pure.stem):
            hint = split_of_path((path.stem, *pure.parts[:-1]))
            _add_meta(found, MetaFile(pure.stem, f"{path}:{member}", hint, zip_path=path, member=member))


def _scan_frame_zip(found: Found, path: Path) -> None:
    """A zip of one clip's frames (`<clip>.zip`) or of several (`<clip>/<frame>` entries)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            directory_start = archive.start_dir
    except Exception as exc:  # noqa: BLE001 - any damage: its clips fail, the scan goes on
        _open_failed(found, path, exc, "unreadable_frames", meta=False)
        return
    names = list(infos)
    for clip, prefix in _clip_prefixes(path, names, meta=False).items():
        frames = zip_frame_names(names, prefix)
        problem = next(
            ((n, p) for n in frames if (p := _member_problem(infos[n], directory_start)) is not None), None
        )
        if problem is not None:
            message = f"{path}: member {problem[0]} {problem[1]}"
            found.broken.setdefault(clip, ("unreadable_frames", message))
            continue
        _add_frames(found, clip, FrameSource("zip", path, prefix, frames))


def _clip_prefixes(path: Path, names: list[str], meta: bool) -> dict[str, str]:
    """Clip name -> its folder in the zip ("" for `<clip>.zip`): frame images, or meta txt files."""
    if meta:
        stems = (PurePosixPath(n).stem for n in names if n.lower().endswith(".txt"))
        return {stem: "" for stem in stems if CLIP_NAME.match(stem)}
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
    return prefixes


def find_files(root: Path, meta_root: Path | None, frames_root: Path, depth: int) -> Found:
    """Meta files and frame sources under the dataset folders (one walk when they are the same)."""
    found = Found()
    roots = [frames_root] if meta_root is None else [meta_root, frames_root]
    if meta_root is not None and meta_root.is_file():
        _scan_meta_zip(found, meta_root)
        if not found.meta_zips and not found.broken:
            raise SourceError(
                f"VFHQ meta zip {meta_root} (vfhq.meta_dir) cannot be read: {'; '.join(found.bad_zips)}. "
                "Re-download it, or unpack it and point vfhq.meta_dir at the folder."
            )
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
                if META_ZIP.match(entry.name) and meta_root is None:
                    _scan_meta_zip(found, path)
                elif not META_ZIP.match(entry.name):
                    _scan_frame_zip(found, path)
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
        f"{len(found.frames)} clip frame folders/zips"
        + (f"; damaged zips: {'; '.join(found.bad_zips[:3])}" if found.bad_zips else "")
        + ". Point ROOT at the VFHQ download, or set vfhq.meta_dir."
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
    broken_meta = {n for n, (reason, _) in found.broken.items() if reason == "malformed_meta"}
    if not found.meta and not broken_meta:
        raise SourceError(_nothing_found_message(meta_root or root, found, config.search_depth))
    result = ScanResult([], [], searched=[f"VFHQ meta files: {len(found.meta)} under {meta_root or root}"])
    for name in sorted(broken_meta - set(found.meta)):
        result.failures.append(ClipFailure(name, dataset, "source", "malformed_meta", found.broken[name][1]))
    matched = _read_metas(found, frames_root, config.meta_max_bytes, dataset, result)

    def record_or_failure(item: tuple[str, VfhqMeta, FrameSource, MetaFile]) -> ClipRecord | ClipFailure:
        name, meta, source, meta_file = item
        try:
            return clip_record(name, meta, source, dataset, meta_file.split_hint)
        except FileNotFoundError as exc:
            return ClipFailure(name, dataset, "source", "missing_frames", str(exc))
        except MetaError as exc:
            return ClipFailure(name, dataset, "source", "malformed_meta", f"{meta_file.where}: {exc}")
        except (OSError, *ZIP_READ_ERRORS) as exc:
            where = f"{source.path}{':' + source.prefix if source.prefix else ''}"
            msg = f"{where}: {type(exc).__name__}: {exc}"
            return ClipFailure(name, dataset, "source", "unreadable_frames", msg)

    # Listing each clip's frames and reading its first image header waits on the file system: threads.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for outcome in pool.map(record_or_failure, matched):
            (result.records if isinstance(outcome, ClipRecord) else result.failures).append(outcome)
    for name in sorted(set(found.frames) - set(found.meta) - broken_meta):
        msg = f"frames {found.frames[name].path} have no meta file Clip+...txt for {name}"
        result.failures.append(ClipFailure(name, dataset, "source", "missing_meta", msg))
    broken_frames = {n for n, (reason, _) in found.broken.items() if reason == "unreadable_frames"}
    for name in sorted(broken_frames - set(found.meta) - set(found.frames) - broken_meta):
        result.failures.append(
            ClipFailure(name, dataset, "source", "unreadable_frames", found.broken[name][1])
        )
    return result


def _read_metas(
    found: Found, frames_root: Path, cap: int, dataset: str, result: ScanResult
) -> list[tuple[str, VfhqMeta, FrameSource, MetaFile]]:
    """Parse every meta file; a clip whose meta or frames cannot be used becomes a failure row."""
    archives: dict[Path, zipfile.ZipFile] = {}
    matched: list[tuple[str, VfhqMeta, FrameSource, MetaFile]] = []
    try:
        for name in sorted(found.meta):
            meta_file = found.meta[name]
            try:
                archive = None
                if meta_file.zip_path is not None:
                    if meta_file.zip_path not in archives:
                        archives[meta_file.zip_path] = zipfile.ZipFile(meta_file.zip_path)
                    archive = archives[meta_file.zip_path]
                meta = parse_meta(meta_file.read_text(archive, cap), name)
            except (MetaError, OSError, UnicodeError, KeyError, *ZIP_READ_ERRORS) as exc:
                result.failures.append(
                    ClipFailure(name, dataset, "source", "malformed_meta", f"{meta_file.where}: {exc}")
                )
                continue
            if meta.duplicate_rows:
                log.warning(
                    "%s: %d frame indices have more than one row; the last row of each is used",
                    meta_file.where,
                    meta.duplicate_rows,
                )
                result.count("duplicate_meta_rows")
            source = found.frames.get(name)
            if source is None and found.broken.get(name, ("",))[0] == "unreadable_frames":
                reason, message = found.broken[name]
                result.failures.append(ClipFailure(name, dataset, "source", reason, message))
                continue
            if source is None:
                msg = f"no frames of {name} under {frames_root} (<ytid>/<clip>/, <clip>/, <clip>.zip or in a zip)"
                if found.bad_zips:
                    msg += f"; damaged zips that may hold it: {'; '.join(found.bad_zips[:3])}"
                result.failures.append(ClipFailure(name, dataset, "source", "missing_frames", msg))
                continue
            matched.append((name, meta, source, meta_file))
    finally:
        for archive in archives.values():
            archive.close()
    return matched
