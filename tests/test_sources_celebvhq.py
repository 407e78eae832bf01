"""CelebV-HQ as users have it: raw/ source videos (the official download's default), processed/ clips
(scene-split ones too), the info file's known defects, attribute and emotion labels by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lookalike import (
    FPS,
    STANDARD_BBOX,
    bbox_for_pixels,
    ceil_frames,
    info_entry,
    make_celebvhq,
    make_raw_video,
    official_cut,
    official_square,
    write_info,
    write_processed,
)

from pipeline.config import CelebvhqConfig
from pipeline.segment import decode_segment
from pipeline.sources.base import SourceError
from pipeline.sources.celebvhq import official_crop, scan_celebvhq


def reasons(result) -> dict[str, str]:
    return {f.clip_id: f.error for f in result.failures}


def manifest_row(record) -> dict:
    return {
        "source": record.source, "source_kind": record.source_kind, "frame_start": record.frame_offset,
        "frame_stop": record.frame_offset + record.num_frames, "width": record.width, "height": record.height,
        "face_boxes": "", "member_prefix": "", "fixed_crop": json.dumps(record.crop_box) if record.crop_box else "",
    }  # fmt: skip


def test_raw_source_video_yields_the_official_processings_frames(tmp_path: Path) -> None:
    # Two clips of one 120-frame source at different times, with different boxes.
    raw = make_raw_video(tmp_path, "ab_C-d", 120, identity=1)
    second_box = bbox_for_pixels(40, 160, 96, 216, 256, 192)  # a 120-px square at (96, 40)
    entries = {
        "ab_C-d_0": info_entry("ab_C-d", 0.4, 1.6, STANDARD_BBOX, emotion="happy"),
        "ab_C-d_1": info_entry("ab_C-d", 2.72, 4.0, second_box, emotion=[
            {"emotion": "sadness", "start_sec": 2.72, "end_sec": 3.0},
            {"emotion": "surprise", "start_sec": 3.0, "end_sec": 4.0},
        ]),
    }  # fmt: skip
    write_info(tmp_path, entries)
    result = scan_celebvhq(tmp_path, CelebvhqConfig())
    assert result.failures == []
    records = {r.clip_id: r for r in result.records}
    for clip_id, entry in entries.items():
        record = records[clip_id]
        start, end = entry["duration"]["start_sec"], entry["duration"]["end_sec"]
        expected = official_cut(raw.frames, start, end)
        x0, y0, x1, y1 = official_square(entry["bbox"], 256, 192)
        assert record.crop_box == [x0, y0, x1, y1]
        assert (record.frame_offset, record.num_frames) == (ceil_frames(start), len(expected))
        side = x1 - x0  # decode at the square's own size: no resize, the pixels must match exactly
        frames = decode_segment(manifest_row(record), side, 1.8, threads=1)["frames"]
        assert np.array_equal(frames, expected[:, y0:y1, x0:x1])
    assert records["ab_C-d_0"].identity == records["ab_C-d_1"].identity == "ab_C-d"
    assert records["ab_C-d_1"].labels["emotion"] == ["sadness", "surprise"]
    assert records["ab_C-d_0"].labels["appearance"] == ["appearance_0", "appearance_3"]


def test_processed_clips_win_and_scene_splits_are_clips(tmp_path: Path) -> None:
    raw = make_raw_video(tmp_path, "vid", 100, identity=0)
    entries = {
        f"vid_{n}": info_entry("vid", 0.4 * n, 0.4 * n + 1.2, STANDARD_BBOX, flags=n) for n in range(3)
    }
    write_info(tmp_path, entries)
    cut = write_processed(tmp_path, "vid_0", raw, entries["vid_0"])
    # A scene-split set: vid_1 as vid_1_0 and vid_1_1.
    write_processed(tmp_path, "vid_1_0", raw, info_entry("vid", 0.4, 1.0, STANDARD_BBOX))
    write_processed(tmp_path, "vid_1_1", raw, info_entry("vid", 1.0, 1.6, STANDARD_BBOX))
    result = scan_celebvhq(tmp_path, CelebvhqConfig())
    records = {r.clip_id: r for r in result.records}
    assert sorted(records) == ["vid_0", "vid_1_0", "vid_1_1", "vid_2"]
    assert records["vid_0"].source.endswith("processed/vid_0.mp4") and records["vid_0"].crop_box is None
    assert records["vid_0"].num_frames == len(cut) and records["vid_1_0"].num_frames == 15
    assert records["vid_2"].source.endswith("raw/vid.mp4") and records["vid_2"].frame_offset == 20
    assert records["vid_1_1"].labels == records["vid_1_0"].labels and records["vid_1_1"].identity == "vid"


def test_info_defects_and_missing_videos_are_failures(tmp_path: Path) -> None:
    make_raw_video(tmp_path, "r1", 60, identity=0)
    entries = {
        "r1_0": info_entry("r1", 0.0, 1.2, STANDARD_BBOX),
        "r1_1": info_entry("r1", 1.0, -1.0, STANDARD_BBOX),  # negative end_sec (in the real file)
        "r1_2": info_entry("r1", 0.8, 0.8, STANDARD_BBOX),  # start == end (in the real file)
        "r1_3": info_entry("r1", 0.0, 1.0, {"top": 0.5, "bottom": 0.2, "left": 0.1, "right": 0.6}),
        "r1_4": info_entry("r1", 30.0, 31.0, STANDARD_BBOX),  # past the end of the source video
        "gone_5": info_entry("gone", 0.0, 1.0, STANDARD_BBOX),
        "noid_6": {"duration": {}},
    }
    write_info(tmp_path, entries)
    (tmp_path / "raw" / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    entries["bad_7"] = info_entry("bad", 0.0, 1.0, STANDARD_BBOX)
    write_info(tmp_path, entries)
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "stray_9.mp4").write_bytes((tmp_path / "raw" / "r1.mp4").read_bytes())
    result = scan_celebvhq(tmp_path, CelebvhqConfig())
    assert [r.clip_id for r in result.records] == ["r1_0"]
    assert reasons(result) == {
        "r1_1": "malformed_meta", "r1_2": "malformed_meta", "r1_3": "malformed_meta", "r1_4": "malformed_meta",
        "gone_5": "missing_video", "noid_6": "malformed_meta", "bad_7": "unreadable_video", "stray_9": "missing_meta",
    }  # fmt: skip
    messages = {f.clip_id: f.message for f in result.failures}
    assert "empty or negative" in messages["r1_1"] and "raw/gone.mp4" in messages["gone_5"]


def test_official_crop_matches_the_documented_processing() -> None:
    for pixels in [(24, 168, 64, 192), (40, 160, 96, 216), (0, 192, 0, 256)]:
        bbox = bbox_for_pixels(*pixels, 256, 192)
        assert tuple(official_crop((bbox["top"], bbox["bottom"], bbox["left"], bbox["right"]), 256, 192)) == (
            official_square(bbox, 256, 192)
        )
    # Growth is clamped at the frame, the side is 2 * (min(h, w) // 2) of the grown, rounded box.
    x0, y0, x1, y1 = official_crop((0.0, 0.5, 0.0, 0.9), 200, 100)
    assert (x1 - x0, y1 - y0) == (52, 52) and (x0, y0) == (66, 0)


@pytest.mark.parametrize(
    "content, match", [(None, "no celebvhq_info.json"), ("{not json", "not valid JSON"), ("[]", "no 'clips'")]
)
def test_unreadable_info_file_stops_the_scan(tmp_path: Path, content, match: str) -> None:
    if content is not None:
        (tmp_path / "celebvhq_info.json").write_text(content)
    with pytest.raises(SourceError, match=match):
        scan_celebvhq(tmp_path, CelebvhqConfig())


def test_info_without_any_video_folder_says_where_it_looked(tmp_path: Path) -> None:
    write_info(tmp_path, {"a_0": info_entry("a", 0, 1, STANDARD_BBOX)})
    with pytest.raises(SourceError, match="looked for processed, videos/ .* and raw/"):
        scan_celebvhq(tmp_path, CelebvhqConfig())


def test_processed_only_download_in_a_subfolder(tmp_path: Path) -> None:
    make_celebvhq(tmp_path / "celebvhq", {"aaa_0": ("aaa", 0, 20), "bbb_1": ("bbb", 1, 18)})
    (tmp_path / "celebvhq" / "processed").rename(tmp_path / "celebvhq" / "videos")
    result = scan_celebvhq(tmp_path / "celebvhq", CelebvhqConfig())
    assert sorted((r.clip_id, r.num_frames) for r in result.records) == [("aaa_0", 20), ("bbb_1", 18)]
    assert result.records[0].fps == FPS
