"""CelebV-HQ reader: `celebvhq_info.json` plus whatever videos the official download left under ROOT.

- `raw/<ytb_id>.mp4`: whole source videos, the official `download_and_process.py`'s default output (its
  processing call is commented out upstream). A clip is cut from its source by `duration` and cropped by
  `bbox` inside the decode step, as the official processing would (see `official_crop`).
- `processed/<clip_id>.mp4` (or `videos/`): clips the official processing cut and cropped; a widely
  shared set splits them by scene into `<clip_id>_<k>.mp4`, each its own clip here. Cut clips win over
  the raw video where both exist.

The identity is the ytb_id (one video may hold several people: keeping them together keeps every
person of a video in one split). Appearance, action and emotion labels travel by name.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CelebvhqConfig
from pipeline.sources.base import ClipFailure, ClipRecord, ScanResult, SourceError, resolve_under
from pipeline.video import VideoInfo, probe_video

log = logging.getLogger(__name__)

INFO_NAME = "celebvhq_info.json"
CUT_DIRS = ("processed", "videos")
RAW_DIR = "raw"
BBOX_GROWTH = 0.02  # the official processing grows the bbox by this (absolute, fraction of the frame)
FPS_RANGE = (1.0, 240.0)  # frame rates a real video has; a probe outside it read a damaged header


class InfoError(ValueError):
    """An info entry that cannot be used; the message says which field."""


def find_info_file(root: Path, config: CelebvhqConfig) -> Path:
    if config.info_file:
        path = resolve_under(root, config.info_file)
        if not path.is_file():
            raise SourceError(f"CelebV-HQ info file {path} does not exist (celebvhq.info_file)")
        return path
    candidates = [root / INFO_NAME, *sorted(root.glob(f"*/{INFO_NAME}"))]
    for path in candidates:
        if path.is_file():
            return path
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    raise SourceError(
        f"no {INFO_NAME} in {root} or its subfolders (set celebvhq.info_file); {root} holds "
        f"{len(listing)}{'+' if len(listing) == 12 else ''} entries: {', '.join(listing) or 'nothing'}"
    )


class _Object(dict):
    """A JSON object that remembers the keys it held more than once (json keeps the last silently)."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    obj.duplicates = [] if len(obj) == len(pairs) else list(Counter(k for k, _ in pairs) - Counter(list(obj)))
    return obj


def load_info(path: Path) -> tuple[dict[str, Any], dict[str, dict], list[str]]:
    """(meta_info, clips, clip ids listed twice) of celebvhq_info.json; a missing or malformed file
    stops the scan."""
    try:
        info = json.loads(path.read_text(), object_pairs_hook=_object)
    except (json.JSONDecodeError, UnicodeError) as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from exc
    clips = info.get("clips") if isinstance(info, dict) else None
    if not isinstance(clips, dict):
        raise SourceError(f"{path} has no 'clips' mapping")
    meta_info = info.get("meta_info") if isinstance(info.get("meta_info"), dict) else {}
    for key in ("appearance_mapping", "action_mapping"):
        names = meta_info.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise SourceError(f"{path}: meta_info.{key} must be a list of names, got {type(names).__name__}")
    return meta_info, clips, sorted(getattr(clips, "duplicates", []))


def _flags(attributes: dict[str, Any], kind: str) -> list[Any]:
    flags = attributes.get(kind)
    if flags is None:
        return []
    finite = (
        all(isinstance(f, int | float) and math.isfinite(f) for f in flags)
        if isinstance(flags, list)
        else False
    )
    if not finite:
        raise InfoError(f"attributes.{kind} must be a list of 0/1 numbers, got {flags!r:.80}")
    return flags


def _emotions(attributes: dict[str, Any]) -> list[str]:
    emotion = attributes.get("emotion")
    if emotion is None:
        return []
    if not isinstance(emotion, dict):
        raise InfoError(f"attributes.emotion must be a mapping, got {emotion!r:.80}")
    raw = emotion.get("labels")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(i, dict) and isinstance(i.get("emotion"), str) for i in raw):
        return [item["emotion"] for item in raw if item["emotion"]]
    raise InfoError(
        f"attributes.emotion.labels must be a name or a list of {{emotion: name}}, got {raw!r:.80}"
    )


def clip_labels(entry: dict[str, Any], meta_info: dict[str, Any]) -> dict[str, list[str]]:
    """Appearance and action attributes set to 1, and the clip's emotions, by name; InfoError names a
    field of the wrong type."""
    attributes = entry.get("attributes")
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise InfoError(f"attributes must be a mapping, got {type(attributes).__name__}")
    labels: dict[str, list[str]] = {}
    for kind in ("appearance", "action"):
        names = meta_info.get(f"{kind}_mapping") or []
        labels[kind] = [name for name, flag in zip(names, _flags(attributes, kind), strict=False) if flag]
    labels["emotion"] = list(dict.fromkeys(_emotions(attributes)))
    return labels


@dataclass
class ClipTimes:
    start_sec: float
    end_sec: float


def clip_times(entry: dict[str, Any]) -> ClipTimes:
    duration = entry.get("duration")
    try:
        start, end = float(duration["start_sec"]), float(duration["end_sec"])
    except (TypeError, KeyError, ValueError, OverflowError) as exc:
        raise InfoError(f"duration needs numeric start_sec and end_sec, got {duration!r}") from exc
    if not (math.isfinite(start) and math.isfinite(end)):
        raise InfoError(f"duration [{start}, {end}) s is not finite")
    if start < 0 or end <= start:
        raise InfoError(f"duration [{start}, {end}) s is empty or negative")
    return ClipTimes(start, end)


def clip_bbox(entry: dict[str, Any]) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) fractions of the source frame."""
    bbox = entry.get("bbox")
    try:
        top, bottom, left, right = (float(bbox[k]) for k in ("top", "bottom", "left", "right"))
    except (TypeError, KeyError, ValueError, OverflowError) as exc:
        raise InfoError(f"bbox needs numeric top, bottom, left, right, got {bbox!r}") from exc
    if not all(math.isfinite(v) for v in (top, bottom, left, right)):
        raise InfoError(f"bbox {bbox} holds NaN or infinity")
    if not (bottom > top and right > left and bottom > 0 and right > 0 and top < 1 and left < 1):
        raise InfoError(f"bbox {bbox} is empty or lies outside the frame")
    inside = (min(bottom, 1) - max(top, 0)) * (min(right, 1) - max(left, 0))
    if inside < 0.5 * (bottom - top) * (right - left):
        raise InfoError(f"bbox {bbox}: under half of it lies inside the frame (fractions 0-1 expected)")
    return top, bottom, left, right


def plain_name(ytb_id: Any) -> bool:
    """A ytb_id usable as a file name under raw/: no folders, no way out of it."""
    return (
        isinstance(ytb_id, str)
        and ytb_id not in ("", ".", "..")
        and not any(c in ytb_id for c in "/\\\0")
        and ".." not in ytb_id
    )


def official_crop(
    bbox: tuple[float, float, float, float], width: int, height: int, min_side: int = 2
) -> list[int]:
    """The square (x0, y0, x1, y1) the official processing crops: the bbox grown by 0.02 per side and
    clamped to [0, 1], rounded to pixels, then squared to side 2 * (min(h, w) // 2) about its centre."""
    top, bottom, left, right = bbox
    top, bottom = max(top - BBOX_GROWTH, 0.0), min(bottom + BBOX_GROWTH, 1.0)
    left, right = max(left - BBOX_GROWTH, 0.0), min(right + BBOX_GROWTH, 1.0)
    top_px, bottom_px = round(top * height), round(bottom * height)
    left_px, right_px = round(left * width), round(right * width)
    half = min(bottom_px - top_px, right_px - left_px) // 2
    if 2 * half < max(min_side, 2):
        raise InfoError(
            f"bbox {bbox} gives a {2 * half}-pixel crop of the {width}x{height} frame, under "
            f"{max(min_side, 2)} (celebvhq.min_crop_pixels)"
        )
    centre_y, centre_x = (top_px + bottom_px) / 2, (left_px + right_px) / 2
    x0, y0 = math.floor(centre_x - half), math.floor(centre_y - half)
    x0, y0 = min(max(x0, 0), width - 2 * half), min(max(y0, 0), height - 2 * half)
    return [x0, y0, x0 + 2 * half, y0 + 2 * half]


def official_frame_range(times: ClipTimes, fps: float) -> tuple[int, int]:
    """Frames [start, stop) whose timestamps fall in [start_sec, end_sec) as the official ffmpeg cut
    selects them (its times are written to the hundredth of a second, truncated)."""
    start_sec = math.floor(times.start_sec * 100 + 1e-6) / 100
    end_sec = math.floor(times.end_sec * 100 + 1e-6) / 100
    return math.ceil(start_sec * fps - 1e-6), math.ceil(end_sec * fps - 1e-6)


def _probe(path: Path) -> VideoInfo | Exception:
    try:
        return probe_video(path)
    except Exception as exc:  # noqa: BLE001 - any decoder error makes this one clip unusable
        return exc


def _cut_dirs(root: Path, config: CelebvhqConfig) -> list[Path]:
    if config.videos_dir:
        path = resolve_under(root, config.videos_dir)
        if not path.is_dir():
            raise SourceError(f"CelebV-HQ videos_dir {path} does not exist (celebvhq.videos_dir)")
        return [path]
    return [root / name for name in CUT_DIRS if (root / name).is_dir()]


def _raw_dir(root: Path, config: CelebvhqConfig) -> Path | None:
    if config.raw_dir:
        path = resolve_under(root, config.raw_dir)
        if not path.is_dir():
            raise SourceError(f"CelebV-HQ raw_dir {path} does not exist (celebvhq.raw_dir)")
        return path
    return root / RAW_DIR if (root / RAW_DIR).is_dir() else None


@dataclass
class _Planned:
    clip_id: str
    parent: str  # the info entry's clip id
    path: Path
    raw: bool


def _cut_files(
    dirs: list[Path], clips: dict[str, dict]
) -> tuple[dict[str, list[tuple[str, Path]]], list[Path]]:
    """Cut clips by their info entry: [(clip id, path)], whole clips and scene parts; and orphans."""
    by_entry: dict[str, list[tuple[str, Path]]] = {}
    orphans: list[Path] = []
    seen: set[str] = set()
    for folder in dirs:
        for path in sorted(folder.glob("*.mp4")):
            stem = path.stem
            if stem in seen:
                continue
            seen.add(stem)
            parent, _, part = stem.rpartition("_")
            if stem in clips:
                by_entry.setdefault(stem, []).append((stem, path))
            elif part.isdigit() and parent in clips:
                by_entry.setdefault(parent, []).append((stem, path))
            else:
                orphans.append(path)
    return by_entry, orphans


def scan_celebvhq(root: Path, config: CelebvhqConfig, dataset: str = "celebvhq") -> ScanResult:
    info_path = find_info_file(root, config)
    meta_info, clips, repeated = load_info(info_path)
    cut_dirs, raw_dir = _cut_dirs(root, config), _raw_dir(root, config)
    looked = [str(d) for d in cut_dirs] + ([str(raw_dir)] if raw_dir else [])
    result = ScanResult(
        [], [], searched=[f"CelebV-HQ: {len(clips)} clips in {info_path}; videos in {looked}"]
    )
    if repeated:
        log.warning(
            "%s lists %d clip ids more than once (the last entry of each is used): %s",
            info_path,
            len(repeated),
            ", ".join(repeated[:5]),
        )
        result.count("duplicate_clip_ids", len(repeated))
    if not cut_dirs and raw_dir is None:
        raise SourceError(
            f"no CelebV-HQ videos under {root}: looked for {', '.join(CUT_DIRS)}/ (cut clips) and {RAW_DIR}/ "
            "(whole source videos); set celebvhq.videos_dir or celebvhq.raw_dir"
        )
    cut, orphans = _cut_files(cut_dirs, clips)
    planned: list[_Planned] = []
    entries: dict[str, dict] = {}
    for clip_id, entry in sorted(clips.items()):
        ytb_id = entry.get("ytb_id") if isinstance(entry, dict) else None
        if not isinstance(ytb_id, str) or not ytb_id:
            msg = f"{info_path.name}: entry {clip_id!r} has no ytb_id"
            result.failures.append(ClipFailure(clip_id, dataset, "source", "malformed_meta", msg))
            continue
        if not plain_name(ytb_id):
            msg = f"{info_path.name}[{clip_id}]: ytb_id {ytb_id!r} is not a plain file name"
            result.failures.append(ClipFailure(clip_id, dataset, "source", "malformed_meta", msg))
            continue
        entries[clip_id] = entry
        if clip_id in cut:
            planned.extend(_Planned(cid, clip_id, path, raw=False) for cid, path in cut[clip_id])
        elif raw_dir is not None and (raw_dir / f"{ytb_id}.mp4").is_file():
            planned.append(_Planned(clip_id, clip_id, raw_dir / f"{ytb_id}.mp4", raw=True))
        else:
            places = [f"{d}/{clip_id}[_<k>].mp4" for d in cut_dirs]
            places += [f"{raw_dir}/{ytb_id}.mp4"] if raw_dir else []
            msg = f"no video: looked for {' and '.join(places)}"
            result.failures.append(ClipFailure(clip_id, dataset, "source", "missing_video", msg))
    # Probing reads only container headers (one per raw source video); threads hide file-system latency.
    paths = sorted({p.path for p in planned})
    with ThreadPoolExecutor(max_workers=8) as pool:
        probes = dict(zip(paths, pool.map(_probe, paths), strict=True))
    for plan in planned:
        entry, probe = entries[plan.parent], probes[plan.path]
        if isinstance(probe, Exception):
            msg = f"{plan.path}: {type(probe).__name__}: {probe}"
            result.failures.append(ClipFailure(plan.clip_id, dataset, "source", "unreadable_video", msg))
            continue
        if not (math.isfinite(probe.fps) and FPS_RANGE[0] <= probe.fps <= FPS_RANGE[1]):
            msg = f"{plan.path}: the container says {probe.fps:g} fps, not a frame rate in {FPS_RANGE[0]:g}-{FPS_RANGE[1]:g}"
            result.failures.append(ClipFailure(plan.clip_id, dataset, "source", "unreadable_video", msg))
            continue
        try:
            labels = clip_labels(entry, meta_info)
        except InfoError as exc:
            msg = f"{info_path.name}[{plan.parent}]: {exc}"
            result.failures.append(ClipFailure(plan.clip_id, dataset, "source", "malformed_meta", msg))
            continue
        record = ClipRecord(
            clip_id=plan.clip_id,
            dataset=dataset,
            identity=str(entry["ytb_id"]),
            source=str(plan.path),
            source_kind="video",
            fps=probe.fps,
            num_frames=probe.num_frames,
            width=probe.width,
            height=probe.height,
            labels=labels,
        )
        if plan.raw:
            try:
                _cut_from_raw(record, entry, probe, config.min_crop_pixels)
            except InfoError as exc:
                msg = f"{info_path.name}[{plan.parent}]: {exc}"
                result.failures.append(ClipFailure(plan.clip_id, dataset, "source", "malformed_meta", msg))
                continue
        result.records.append(record)
    for path in orphans:
        msg = f"{path} has no entry in {info_path.name}"
        result.failures.append(ClipFailure(path.stem, dataset, "source", "missing_meta", msg))
    return result


def _cut_from_raw(record: ClipRecord, entry: dict[str, Any], probe: VideoInfo, min_crop: int) -> None:
    """Make a whole-source-video record into the clip: its frame range and its official crop."""
    start, stop = official_frame_range(clip_times(entry), probe.fps)
    if start >= probe.num_frames:
        raise InfoError(f"starts at frame {start}, the source video has {probe.num_frames}")
    if stop > probe.num_frames:
        log.warning(
            "%s: ends at frame %d, the source has %d; cut there", record.clip_id, stop, probe.num_frames
        )
        stop = probe.num_frames
    record.crop_box = official_crop(clip_bbox(entry), probe.width, probe.height, min_crop)
    record.frame_offset = start
    record.num_frames = stop - start
