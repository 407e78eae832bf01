"""VFHQ as users have it: the official extraction layout, meta files in split folders or a zip, both row
conventions, ids with `_` / `-`, frames numbered from 1, cropped or full frames, multi-clip zips."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from lookalike import make_vfhq_clip, render_vfhq_clip, vfhq_meta_text, zip_meta_folder

from pipeline.config import VfhqConfig
from pipeline.manifest import split_segments
from pipeline.segment import decode_segment
from pipeline.sources.base import SourceError
from pipeline.sources.vfhq import MetaError, absolute_indices, parse_meta, scan_vfhq


def reasons(result) -> dict[str, str]:
    return {f.clip_id: f.error for f in result.failures}


def record_row(record, resolution: int = 64) -> dict:
    """The manifest row of a record's whole clip (as pipeline/manifest.py makes it)."""
    return {
        "source": record.source, "source_kind": record.source_kind, "frame_start": record.frame_offset,
        "frame_stop": record.frame_offset + record.num_frames, "width": record.width, "height": record.height,
        "face_boxes": json.dumps(record.face_boxes), "member_prefix": record.member_prefix, "fixed_crop": "",
    }  # fmt: skip


def test_official_extraction_layout_builds_with_nothing_but_root(tmp_path: Path) -> None:
    # <out>/<ytid>/<clip>/00000001.png, cropped; meta under meta_info/VFHQ-Train and VFHQ-Test.
    a = make_vfhq_clip(tmp_path, "_-dRk4_x-Z", 0, 20, identity=0)
    b = make_vfhq_clip(tmp_path, "ab_c-d", 1, 18, identity=1, rows_from_start=False)
    c = make_vfhq_clip(tmp_path, "test-id_9", 2, 16, identity=2, split_folder="VFHQ-Test")
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert result.failures == []
    records = {r.clip_id: r for r in result.records}
    assert sorted(records) == sorted([a, b, c])
    # end - start - 1 frames each, whichever row convention the meta file follows
    assert [records[n].num_frames for n in (a, b, c)] == [20, 18, 16]
    assert records[a].identity == "_-dRk4_x-Z+P0" and records[a].source_kind == "frames"
    assert (records[a].split_hint, records[c].split_hint) == ("train", "test")


def test_cropped_frames_get_their_boxes_shifted_into_the_crop(tmp_path: Path) -> None:
    name = make_vfhq_clip(tmp_path, "yt", 3, 12)
    spec = render_vfhq_clip("yt", 3, 12)
    (record,) = scan_vfhq(tmp_path, VfhqConfig()).records
    x0, y0, x1, y1 = spec.crop
    assert (record.width, record.height) == (x1 - x0, y1 - y0)
    # frame k (from 1) is absolute start+k: its box is the source box of frame k, minus the crop origin
    expected = spec.boxes[1:] - [x0, y0, x0, y0]
    assert record.clip_id == name and np.allclose(record.face_boxes, expected, atol=1e-3)


def test_cropped_and_full_frames_decode_to_the_same_face(tmp_path: Path) -> None:
    cropped_root, full_root = tmp_path / "cropped", tmp_path / "full"
    make_vfhq_clip(cropped_root, "yt", 4, 12)
    make_vfhq_clip(full_root, "yt", 4, 12, layout="folder")
    (cropped,) = scan_vfhq(cropped_root, VfhqConfig()).records
    (full,) = scan_vfhq(full_root, VfhqConfig()).records
    assert full.width == 192 and cropped.width < 192
    a = decode_segment(record_row(cropped), 64, 1.8, threads=1)["frames"]
    b = decode_segment(record_row(full), 64, 1.8, threads=1)["frames"]
    # The square around the face reaches past the CROP box (black there): compare its middle.
    assert a.shape == b.shape == (12, 64, 64, 3)
    assert np.abs(a[:, 16:48, 16:48].astype(int) - b[:, 16:48, 16:48]).mean() < 1.0


def test_zips_single_and_multi_clip_and_a_zipped_meta_folder(tmp_path: Path) -> None:
    one = make_vfhq_clip(tmp_path, "z1", 5, 14, layout="zip", identity=1)
    g1 = make_vfhq_clip(tmp_path, "g-1", 6, 12, layout="group:3")
    g2 = make_vfhq_clip(tmp_path, "g_2", 7, 15, layout="group:3", rows_from_start=False)
    zip_meta_folder(tmp_path)  # meta_info.zip, never unpacked
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert result.failures == []
    records = {r.clip_id: r for r in result.records}
    assert (records[one].source_kind, records[one].member_prefix) == ("zip", "")
    assert records[g1].source == records[g2].source and records[g1].source.endswith("group3.zip")
    assert records[g2].member_prefix == f"{g2}/" and records[g2].num_frames == 15
    assert records[g1].split_hint == "train"
    # The frames of one clip of a group zip, and only those, decode.
    frames = decode_segment(record_row(records[g2]), 32, 1.8, threads=1)["frames"]
    spec = render_vfhq_clip("g_2", 7, 15)
    assert frames.shape == (15, 32, 32, 3)
    assert np.allclose(records[g2].face_boxes, spec.boxes[1:], atol=1e-3)  # full frames: boxes as they are


def test_rows_are_matched_to_frames_by_absolute_index() -> None:
    spec = render_vfhq_clip("yt", 8, 10)
    for rows_from in (spec.start, spec.start + 1):
        meta = parse_meta(vfhq_meta_text(spec, rows_from), spec.name)
        assert min(meta.boxes) == rows_from and max(meta.boxes) == spec.end - 1
    names = [f"{k:08d}.png" for k in range(1, 11)]
    assert absolute_indices(names, spec.start) == list(range(spec.start + 1, spec.end))
    assert absolute_indices([f"{k:08d}.png" for k in range(10)], 50) == list(range(50, 60))  # 0-based
    absolute = [f"{k:08d}.png" for k in range(spec.start + 1, spec.end)]
    assert absolute_indices(absolute, spec.start) == list(range(spec.start + 1, spec.end))


def test_frames_without_rows_are_left_out(tmp_path: Path) -> None:
    name = make_vfhq_clip(tmp_path, "cut", 9, 20, rows_from_start=False)
    path = next((tmp_path / "meta_info").rglob("*.txt"))
    lines = path.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line[:1].isdigit()]
    del lines[rows[14]]  # a gap: frames 1-14 and 16-20 have rows; the longer run is used
    path.write_text("\n".join(lines) + "\n")
    (record,) = scan_vfhq(tmp_path, VfhqConfig()).records
    assert record.clip_id == name and (record.frame_offset, record.num_frames) == (0, 14)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.replace("FPS: 25\n", ""), "header lacks \\['FPS'\\]"),
        (lambda t: t.rsplit("CROP", 1)[0], "no CROP line"),
        (lambda t: t.replace("W: 192", "W: 40"), "outside the 40x144 frame"),
        (lambda t: "\n".join(line for line in t.splitlines() if not line[:1].isdigit()), "no frame rows"),
    ],
)
def test_meta_errors_name_the_problem(edit, match: str) -> None:
    spec = render_vfhq_clip("x", 0, 12)
    with pytest.raises(MetaError, match=match):
        parse_meta(edit(vfhq_meta_text(spec, spec.start)), spec.name)


def test_bad_clips_become_failures_with_reasons(tmp_path: Path) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 16)
    truncated = make_vfhq_clip(tmp_path, "trunc", 1, 16)
    meta = tmp_path / "meta_info" / "VFHQ-Train"
    path = meta / f"{truncated}.txt"
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    no_frames = make_vfhq_clip(tmp_path, "noframes", 2, 16, layout="none")
    orphan = make_vfhq_clip(tmp_path, "orphan", 3, 16)
    (meta / f"{orphan}.txt").unlink()
    empty = "Clip+empty+P0+C4+F30-30"
    (meta / f"{empty}.txt").write_text((meta / f"{good}.txt").read_text())
    far = make_vfhq_clip(tmp_path, "far", 5, 16)
    far_path = meta / f"{far}.txt"
    far_path.write_text(far_path.read_text().replace("W: 192", "W: 20"))  # every box past the frame
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert [r.clip_id for r in result.records] == [good]
    assert reasons(result) == {
        truncated: "malformed_meta",
        no_frames: "missing_frames",
        orphan: "missing_meta",
        empty: "malformed_meta",
        far: "malformed_meta",
    }
    messages = {f.clip_id: f.message for f in result.failures}
    assert "end <= start" in messages[empty] and "outside" in messages[far]


def test_a_root_without_meta_files_says_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no VFHQ meta files .* found 1 folders, 0 other .txt files"):
        scan_vfhq(tmp_path, VfhqConfig())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match=r"1 other .txt files in notes \(1\)"):
        scan_vfhq(tmp_path, VfhqConfig())


def test_configured_folders_override_the_search(tmp_path: Path) -> None:
    make_vfhq_clip(tmp_path / "a", "yt", 0, 12)
    make_vfhq_clip(tmp_path / "b", "yt", 1, 12)  # a second download the override must ignore
    config = VfhqConfig(meta_dir=str(tmp_path / "a" / "meta_info"), frames_dir=str(tmp_path / "a"))
    result = scan_vfhq(tmp_path, config)
    assert len(result.records) == 1 and result.failures == []
    with pytest.raises(SourceError, match="does not exist"):
        scan_vfhq(tmp_path, VfhqConfig(meta_dir="nowhere"))
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as archive:
        spec = render_vfhq_clip("yt", 1, 12)
        archive.writestr(f"VFHQ-Test/{spec.name}.txt", vfhq_meta_text(spec, spec.start))
    (record,) = scan_vfhq(tmp_path, VfhqConfig(meta_dir="m.zip", frames_dir="b")).records
    assert record.split_hint == "test"


def test_segments_of_an_offset_clip_cover_its_frames(tmp_path: Path) -> None:
    make_vfhq_clip(tmp_path, "cut", 9, 20)
    path = next((tmp_path / "meta_info").rglob("*.txt"))
    lines = path.read_text().splitlines()
    first_row = next(i for i, line in enumerate(lines) if line[:1].isdigit())
    del lines[first_row : first_row + 4]  # rows start..start+3 gone: frames 1-3 have no row
    path.write_text("\n".join(lines) + "\n")
    (record,) = scan_vfhq(tmp_path, VfhqConfig()).records
    assert (record.frame_offset, record.num_frames) == (3, 17)
    assert split_segments(record.num_frames, 10) == [(0, 10), (7, 17)]
