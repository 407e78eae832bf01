"""CelebV-HQ reader: `celebvhq_info.json` plus the processed `<clip_id>.mp4` files.

The processed clips are already cut and cropped around the face by the official script (bbox grown
by 0.02 and squared), so the whole frame is the face crop and no boxes are needed.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import CelebvhqConfig
from pipeline.sources.base import ClipFailure, ClipRecord, ScanResult, SourceError
from pipeline.video import VideoInfo, probe_video

log = logging.getLogger(__name__)


def load_info(path: Path) -> dict[str, dict]:
    """The `clips` mapping of celebvhq_info.json; a missing or malformed file stops the scan."""
    if not path.is_file():
        raise SourceError(f"CelebV-HQ info file {path} does not exist (set celebvhq.info_file)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeError) as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from exc
    clips = info.get("clips") if isinstance(info, dict) else None
    if not isinstance(clips, dict):
        raise SourceError(f"{path} has no 'clips' mapping")
    return clips


def _probe(path: Path) -> VideoInfo | Exception:
    try:
        return probe_video(path)
    except Exception as exc:  # noqa: BLE001 - any decoder error makes this one clip unusable
        return exc


def scan_celebvhq(root: Path, config: CelebvhqConfig, dataset: str = "celebvhq") -> ScanResult:
    clips = load_info(root / config.info_file)
    videos = root / config.videos_dir
    result = ScanResult([], [])
    candidates: list[tuple[str, str, Path]] = []
    for clip_id, entry in sorted(clips.items()):
        ytb_id = entry.get("ytb_id") if isinstance(entry, dict) else None
        if not isinstance(ytb_id, str) or not ytb_id:
            msg = f"entry {clip_id!r} has no ytb_id"
            result.failures.append(ClipFailure(clip_id, dataset, "source", "malformed_meta", msg))
            continue
        path = videos / f"{clip_id}.mp4"
        if not path.is_file():
            result.failures.append(
                ClipFailure(clip_id, dataset, "source", "missing_video", f"{path} does not exist")
            )
            continue
        candidates.append((clip_id, ytb_id, path))
    # Probing reads only container headers; threads hide the file-system latency.
    with ThreadPoolExecutor(max_workers=8) as pool:
        probes = list(pool.map(_probe, [path for _, _, path in candidates]))
    for (clip_id, ytb_id, path), probe in zip(candidates, probes, strict=True):
        if isinstance(probe, Exception):
            msg = f"{path}: {type(probe).__name__}: {probe}"
            result.failures.append(ClipFailure(clip_id, dataset, "source", "unreadable_video", msg))
            continue
        result.records.append(
            ClipRecord(
                clip_id=clip_id,
                dataset=dataset,
                identity=ytb_id,
                source=str(path),
                source_kind="video",
                fps=probe.fps,
                num_frames=probe.num_frames,
                width=probe.width,
                height=probe.height,
            )
        )
    if videos.is_dir():
        for path in sorted(videos.glob("*.mp4")):
            if path.stem not in clips:
                msg = f"{path} has no entry in {config.info_file}"
                result.failures.append(ClipFailure(path.stem, dataset, "source", "missing_meta", msg))
    return result
