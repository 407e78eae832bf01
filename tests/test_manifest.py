from __future__ import annotations

import json
import random

import pytest

from pipeline.config import BuildConfig
from pipeline.manifest import build_manifest, split_segments
from pipeline.mix import bucket_for
from pipeline.sources.base import ClipRecord, ScanResult


@pytest.mark.parametrize("num_frames", [1, 16, 63, 64, 65, 128, 129, 500])
@pytest.mark.parametrize("max_frames", [16, 64])
def test_segments_are_full_windows_covering_every_frame(num_frames: int, max_frames: int) -> None:
    bounds = split_segments(num_frames, max_frames)
    assert bounds[0][0] == 0 and bounds[-1][1] == num_frames
    assert all(b[0] <= a[1] for a, b in zip(bounds, bounds[1:], strict=False))  # no frame left out
    lengths = {stop - start for start, stop in bounds}
    assert lengths == {min(num_frames, max_frames)}  # every segment as long as the cap allows
    assert len(bounds) == -(-num_frames // max_frames)


@pytest.mark.parametrize("num_frames", range(181, 600, 7))
def test_every_clip_long_enough_for_stage_2_gives_stage_2_segments(num_frames: int) -> None:
    span = (16 - 1) * 12 + 1
    assert all(stop - start >= span for start, stop in split_segments(num_frames, 240))


def record(clip_id: str, num_frames: int, boxes: bool = True) -> ClipRecord:
    face_boxes = [[float(t), 0.0, t + 10.0, 10.0] for t in range(num_frames)] if boxes else None
    return ClipRecord(
        clip_id, "vfhq", f"id-{clip_id}", f"/x/{clip_id}", "frames", 25.0, num_frames, 64, 64, face_boxes
    )


def test_manifest_segments_share_bucket_and_slice_boxes() -> None:
    config = BuildConfig(max_frames=50, min_frames=10)
    manifest, failures = build_manifest(ScanResult([record("a", 120), record("b", 5)], []), config)
    assert [f.error for f in failures] == ["too_short"] and failures[0].clip_id == "b"
    assert list(manifest["segment"]) == [0, 1, 2] and manifest["bucket"].nunique() == 1
    assert manifest["key"].is_unique and not any("." in k for k in manifest["key"])
    assert list(manifest["frame_start"]) == [0, 50, 70] and list(manifest["frame_stop"]) == [50, 100, 120]
    last = json.loads(manifest.loc[2, "face_boxes"])
    assert len(last) == 50 and last[0][0] == manifest.loc[2, "frame_start"]


def test_colliding_keys_fail_both_clips() -> None:
    scan = ScanResult([record("a.b", 20), record("a_b", 20), record("c", 20)], [])
    manifest, failures = build_manifest(scan, BuildConfig(min_frames=10))
    assert sorted((f.clip_id, f.error) for f in failures) == [
        ("a.b", "id_collision"),
        ("a_b", "id_collision"),
    ]
    assert list(manifest["clip_id"]) == ["c"]


def test_bucket_is_fixed_by_clip_and_seed_not_order() -> None:
    mix = {"real": 0.5, "swap": 0.4, "style": 0.1}
    ids = [f"clip{i}" for i in range(300)]
    first = {c: bucket_for("vfhq", c, 7, mix) for c in ids}
    random.Random(1).shuffle(ids)
    assert {c: bucket_for("vfhq", c, 7, mix) for c in ids} == first
    assert {c: bucket_for("vfhq", c, 8, mix) for c in ids} != first


def test_bucket_shares_follow_the_mix() -> None:
    mix = {"real": 0.5, "swap": 0.4, "style": 0.1}
    buckets = [bucket_for("celebvhq", f"c{i}", 0, mix) for i in range(20000)]
    for name, share in mix.items():
        assert buckets.count(name) / len(buckets) == pytest.approx(share, abs=0.015)
    only_real = {"real": 1.0, "swap": 0.0, "style": 0.0}
    assert {bucket_for("x", f"c{i}", 0, only_real) for i in range(500)} == {"real"}
