"""The manifest: one row per clip segment, with its bucket (decided over the whole manifest by
pipeline/mix.py), built from a source scan."""

from __future__ import annotations

import json
from collections import defaultdict

import pandas as pd

from pipeline.config import BuildConfig
from pipeline.contract import sample_key
from pipeline.mix import assign_buckets
from pipeline.sources.base import ClipFailure, ClipRecord, ScanResult
from pipeline.splits import SPLITS, assign_splits

MANIFEST_COLUMNS = [
    "key",
    "clip_id",
    "dataset",
    "identity",
    "source",
    "source_kind",
    "fps",
    "segment",
    "frame_start",
    "frame_stop",
    "width",
    "height",
    "face_boxes",
    "fixed_crop",
    "member_prefix",
    "bucket",
    "split",
    "labels",
]


def split_segments(num_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """Windows of exactly max_frames over [0, num_frames), the last one ending at the clip's end and
    overlapping the one before; a clip no longer than max_frames is one segment.

    Full windows keep every segment as long as the cap allows: near-equal parts turned a 241-362-frame
    clip into two of 121-181 frames, too short for stage 2's 181-frame span at max_frames 240.
    """
    if num_frames <= max_frames:
        return [(0, num_frames)]
    bounds = [(start, start + max_frames) for start in range(0, num_frames - max_frames + 1, max_frames)]
    if bounds[-1][1] < num_frames:
        bounds.append((num_frames - max_frames, num_frames))
    return bounds


def colliding_ids(records: list[ClipRecord]) -> tuple[list[ClipRecord], list[ClipFailure]]:
    """Records whose ids stay distinct once made tar-safe, and a failure row for EVERY record of a
    colliding group (`a.b_0` and `a b_0` both become `a_b_0`: neither can be told apart in the shards)."""
    groups: dict[str, list[ClipRecord]] = defaultdict(list)
    for record in records:
        groups[sample_key(record.dataset, record.clip_id, 0).rsplit("__s", 1)[0]].append(record)
    kept, failures = [], []
    for key, group in groups.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        for record in group:
            others = sorted({repr(r.clip_id) for r in group if r is not record} or {repr(record.clip_id)})
            msg = (
                f"clip id {record.clip_id!r} ({record.source}) and {', '.join(others)} all become the sample "
                f"key {key!r}: rename one of the files"
            )
            failures.append(ClipFailure(record.clip_id, record.dataset, "manifest", "id_collision", msg))
    return kept, failures


def build_manifest(scan: ScanResult, config: BuildConfig) -> tuple[pd.DataFrame, list[ClipFailure]]:
    """Segments of every usable clip; clips shorter than min_frames or whose ids collide become failures."""
    rows = []
    records, failures = colliding_ids(scan.records)
    usable = [r for r in records if r.num_frames >= config.min_frames]
    buckets = assign_buckets([(r.dataset, r.clip_id, r.num_frames) for r in usable], config.seed, config.mix)
    splits = assign_splits(usable, config.splits)
    for record in records:
        if record.num_frames < config.min_frames:
            msg = f"{record.num_frames} frames < min_frames {config.min_frames}"
            failures.append(ClipFailure(record.clip_id, record.dataset, "manifest", "too_short", msg))
            continue
        bucket = buckets[(record.dataset, record.clip_id)]
        for segment, (start, stop) in enumerate(split_segments(record.num_frames, config.max_frames)):
            boxes = record.face_boxes[start:stop] if record.face_boxes is not None else None
            rows.append(
                {
                    "key": sample_key(record.dataset, record.clip_id, segment),
                    "clip_id": record.clip_id,
                    "dataset": record.dataset,
                    "identity": record.identity,
                    "source": record.source,
                    "source_kind": record.source_kind,
                    "fps": float(record.fps),
                    "segment": segment,
                    "frame_start": record.frame_offset + start,
                    "frame_stop": record.frame_offset + stop,
                    "width": record.width,
                    "height": record.height,
                    "face_boxes": json.dumps(boxes) if boxes is not None else "",
                    "fixed_crop": json.dumps(record.crop_box) if record.crop_box else "",
                    "member_prefix": record.member_prefix,
                    "bucket": bucket,
                    "split": splits[(record.dataset, record.clip_id)],
                    "labels": json.dumps(record.labels or {}, sort_keys=True),
                }
            )
    # Splits kept together: the writer makes one shard per split it meets in a batch.
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    order = manifest["split"].map({name: i for i, name in enumerate(SPLITS)})
    manifest = (
        manifest.assign(_order=order).sort_values(["_order", "key"], kind="stable").drop(columns="_order")
    )
    manifest = manifest.reset_index(drop=True)
    return manifest, failures
