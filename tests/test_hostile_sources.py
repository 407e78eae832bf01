"""Damaged VFHQ / CelebV-HQ downloads: every bad file becomes a failure row naming it, the scan goes on.

Bad zips are written byte by byte from the zip spec (APPNOTE: local header PK\\3\\4, central directory
PK\\1\\2, end record PK\\5\\6), bad JSON with the literals Python's json reads (NaN, Infinity).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
from lookalike import (
    STANDARD_BBOX,
    info_entry,
    make_raw_video,
    make_vfhq_clip,
    png,
    render_vfhq_clip,
    vfhq_meta_text,
    write_info,
)

from pipeline.build import BuildSummary
from pipeline.config import BuildConfig, CelebvhqConfig, VfhqConfig
from pipeline.manifest import build_manifest
from pipeline.sources.base import SourceError
from pipeline.sources.celebvhq import scan_celebvhq
from pipeline.sources.vfhq import MetaError, parse_meta, scan_vfhq

LOCAL = struct.Struct("<4s5H3L2H")  # signature, version, flags, method, time, date, crc, sizes, lengths
CENTRAL = struct.Struct("<4s6H3L5H2L")
END = struct.Struct("<4s4H2LH")
UTF8_FLAG, ENCRYPTED_FLAG, AES_METHOD = 0x800, 0x1, 99
AES_EXTRA = struct.pack("<HHH2sBH", 0x9901, 7, 2, b"AE", 3, 0)  # AE-2, 256-bit, inner method stored


@dataclasses.dataclass
class Member:
    name: bytes
    data: bytes
    flags: int = 0
    method: int = 0  # stored
    extra: bytes = b""


def zip_bytes(members: list[Member]) -> tuple[bytes, list[int]]:
    """A stored zip of `members`; also the offset of each member's central directory entry."""
    out, central, entries = bytearray(), bytearray(), []
    for m in members:
        crc, size, offset = zlib.crc32(m.data), len(m.data), len(out)
        out += LOCAL.pack(
            b"PK\x03\x04", 20, m.flags, m.method, 0, 0x21, crc, size, size, len(m.name), len(m.extra)
        )
        out += m.name + m.extra + m.data
        entries.append(len(central))
        central += CENTRAL.pack(
            b"PK\x01\x02", 20, 20, m.flags, m.method, 0, 0x21, crc, size, size, len(m.name), len(m.extra),
            0, 0, 0, 0, offset,
        )  # fmt: skip
        central += m.name + m.extra
    start = len(out)
    out += central + END.pack(b"PK\x05\x06", 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out), [start + e for e in entries]


def frame_members(name: str, num_frames: int, clip: int, prefix: bool) -> list[Member]:
    """The clip's full frames as `<clip>/<k>.png` (prefix) or `<k>.png` members."""
    spec = render_vfhq_clip(name.split("+")[1], clip, num_frames)
    folder = f"{name}/" if prefix else ""
    return [
        Member(f"{folder}{k:08d}.png".encode(), png(frame))
        for k, frame in enumerate(spec.extracted(cropped=False), 1)
    ]


def reasons(result) -> dict[str, str]:
    return {f.clip_id: f.error for f in result.failures}


def messages(result) -> dict[str, str]:
    return {f.clip_id: f.message for f in result.failures}


# ---------------------------------------------------------------------------------------------------
# VFHQ: the walk


def test_symlink_loops_anywhere_in_the_walk_are_skipped(tmp_path: Path) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 12)
    out = tmp_path / "extracted_cropped_face_results"
    os.symlink("x", tmp_path / "x")  # points to itself: ELOOP
    os.symlink("y", out / "good" / "y")
    os.symlink("z.zip", tmp_path / "meta_info" / "z.zip")
    os.symlink("Clip+loop+P0+C1+F1-9", out / "Clip+loop+P0+C1+F1-9")
    os.symlink("nowhere", out / "dangling")
    os.symlink(tmp_path, out / "good" / "back_to_root")  # a loop through an ancestor: followed, once
    result = scan_vfhq(tmp_path, VfhqConfig(search_depth=8))
    assert [r.clip_id for r in result.records] == [good] and result.failures == []


def test_a_folder_linked_in_from_outside_is_still_read(tmp_path: Path) -> None:
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    name = make_vfhq_clip(elsewhere, "linked", 0, 12)
    root.mkdir()
    os.symlink(elsewhere / "meta_info", root / "meta_info")
    os.symlink(elsewhere / "extracted_cropped_face_results", root / "frames")
    assert [r.clip_id for r in scan_vfhq(root, VfhqConfig()).records] == [name]


# ---------------------------------------------------------------------------------------------------
# VFHQ: damaged clip zips


def _bad_utf8_name(name: str) -> tuple[list[Member], str]:
    members = frame_members(name, 12, 1, prefix=True)
    members[4] = Member(f"{name}/".encode() + b"\xff\xfe0005.png", members[4].data, flags=UTF8_FLAG)
    return members, "damaged"


def _aes_member(name: str) -> tuple[list[Member], str]:
    members = frame_members(name, 12, 1, prefix=True)
    members[6] = Member(members[6].name, os.urandom(64), ENCRYPTED_FLAG, AES_METHOD, AES_EXTRA)
    return members, "encrypted (WinZip AES)"


@pytest.mark.parametrize(
    "damage", ["bad_utf8_name", "aes_member", "central_signature", "end_record_offset", "member_offset"]
)
def test_damaged_clip_zip_fails_its_clips_only(tmp_path: Path, damage: str) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 12, layout="folder")
    bad = make_vfhq_clip(tmp_path, "bad", 1, 12, layout="none")
    other = make_vfhq_clip(tmp_path, "other", 2, 12, layout="none")
    if damage == "bad_utf8_name":
        members, problem = _bad_utf8_name(bad)
    elif damage == "aes_member":
        members, problem = _aes_member(bad)
    else:
        members, problem = frame_members(bad, 12, 1, prefix=True), "damaged"
    members += frame_members(other, 12, 2, prefix=True)
    data, entries = zip_bytes(members)
    data = bytearray(data)
    if damage == "central_signature":
        data[entries[0] : entries[0] + 4] = b"PK\xff\xff"
    elif damage == "end_record_offset":
        data[-6:-2] = struct.pack("<L", len(data) * 3)  # the end record's directory offset, past the file
    elif damage == "member_offset":
        data[entries[7] + 42 : entries[7] + 46] = struct.pack("<L", len(data) - 40)  # a later frame's offset
        problem = "runs past the start of the central directory"
    path = tmp_path / "frames" / "group1.zip"
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    result = scan_vfhq(tmp_path, VfhqConfig())
    one_member = damage in ("aes_member", "member_offset")  # the zip lists; only that clip fails
    assert [r.clip_id for r in result.records] == ([good, other] if one_member else [good])
    failed = reasons(result)
    assert failed == (
        {bad: "unreadable_frames"} if one_member else dict.fromkeys([bad, other], "unreadable_frames")
    )
    assert str(path) in messages(result)[bad] and problem in messages(result)[bad]


def test_damaged_meta_zip_fails_its_clips_and_the_rest_build(tmp_path: Path) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 12)
    a = make_vfhq_clip(tmp_path, "a", 1, 12, split_folder=None)
    b = make_vfhq_clip(tmp_path, "b", 2, 12, split_folder=None)
    texts = {n: (tmp_path / "meta_info" / f"{n}.txt").read_bytes() for n in (a, b)}
    for n in (a, b):
        (tmp_path / "meta_info" / f"{n}.txt").unlink()
    encrypted = Member(f"meta/{b}.txt".encode(), texts[b], ENCRYPTED_FLAG, AES_METHOD, AES_EXTRA)
    (tmp_path / "meta_extra.zip").write_bytes(
        zip_bytes([Member(f"meta/{a}.txt".encode(), texts[a]), encrypted])[0]
    )
    # A second meta zip whose names are flagged UTF-8 but hold other bytes: zipfile cannot list it.
    name = f"meta/{a}.txt".encode().replace(b"+P0", b"\xff+P0")
    (tmp_path / "meta_info.zip").write_bytes(zip_bytes([Member(name, texts[a], flags=UTF8_FLAG)])[0])
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert sorted(r.clip_id for r in result.records) == sorted([good, a])
    assert reasons(result)[b] == "malformed_meta" and "meta_extra.zip" in messages(result)[b]
    assert "encrypted" in messages(result)[b]
    damaged = [f for f in result.failures if "meta_info.zip" in f.message]
    assert len(damaged) == 1 and damaged[0].error == "malformed_meta" and "damaged" in damaged[0].message


def test_an_unreadable_configured_meta_zip_is_a_clear_error(tmp_path: Path) -> None:
    make_vfhq_clip(tmp_path, "good", 0, 12)
    (tmp_path / "meta.zip").write_bytes(b"PK\x03\x04" + os.urandom(500))
    with pytest.raises(SourceError, match=r"meta zip .*meta\.zip \(vfhq\.meta_dir\) cannot be read"):
        scan_vfhq(tmp_path, VfhqConfig(meta_dir="meta.zip"))


# ---------------------------------------------------------------------------------------------------
# VFHQ: meta values


@pytest.mark.parametrize(
    "line, match",
    [
        ("FPS: nan", "line 4: FPS nan is not a frame rate"),
        ("FPS: inf", "line 4: FPS inf"),
        ("FPS: 1e308", "line 4: FPS 1e\\+308"),
        ("FPS: 1e-300", "line 4: FPS 1e-300"),
        ("FPS: 0.5", "line 4: FPS 0.5"),
        ("W: nan", "line 3: W nan is not a frame size"),
        ("W: 1e9", "line 3: W 1e\\+09"),
        ("H: -144", "line 2: H -144"),
        ("H: inf", "line 2: H inf"),
    ],
)
def test_header_numbers_must_be_finite_and_sane(line: str, match: str) -> None:
    spec = render_vfhq_clip("x", 0, 12)
    key = line.split(":")[0]
    text = "\n".join(
        line if old.startswith(f"{key}:") else old for old in vfhq_meta_text(spec, spec.start).splitlines()
    )
    with pytest.raises(MetaError, match=match):
        parse_meta(text, spec.name)


def test_a_tiny_fps_is_a_failure_row_naming_the_line(tmp_path: Path) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 12)
    bad = make_vfhq_clip(tmp_path, "bad", 1, 12)
    path = tmp_path / "meta_info" / "VFHQ-Train" / f"{bad}.txt"
    path.write_text(path.read_text().replace("FPS: 25", "FPS: 1e-300"))
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert [r.clip_id for r in result.records] == [good] and reasons(result) == {bad: "malformed_meta"}
    assert f"{bad}.txt" in messages(result)[bad] and "line 4: FPS 1e-300" in messages(result)[bad]


def test_duplicate_meta_rows_keep_the_last_and_are_counted(tmp_path: Path) -> None:
    name = make_vfhq_clip(tmp_path, "dup", 0, 12)
    make_vfhq_clip(tmp_path, "clean", 1, 12)
    path = tmp_path / "meta_info" / "VFHQ-Train" / f"{name}.txt"
    lines = path.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line[:1].isdigit()]
    index, *rest = lines[rows[3]].split()
    lines.insert(rows[3] + 1, " ".join([index, rest[0], str(float(rest[1]) + 2), *rest[2:]]))
    path.write_text("\n".join(lines) + "\n")
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert result.failures == [] and result.counters == {"duplicate_meta_rows": 1}
    record = next(r for r in result.records if r.clip_id == name)
    # the second row of the frame wins (its x0 moved 2 px); full frames are cropped: shift by CROP x0
    spec = render_vfhq_clip("dup", 0, 12)
    row_frame = int(index) - spec.start - 1  # position of that frame among the extracted files
    assert record.face_boxes[row_frame][0] == pytest.approx(float(rest[1]) + 2 - spec.crop[0], abs=1e-3)
    assert "source_counters" in {f.name for f in dataclasses.fields(BuildSummary)}


def test_meta_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 12)
    big = make_vfhq_clip(tmp_path, "big", 1, 12)
    path = tmp_path / "meta_info" / "VFHQ-Train" / f"{big}.txt"
    path.write_text(path.read_text() + "\n" * 3000)
    size = path.stat().st_size
    result = scan_vfhq(tmp_path, VfhqConfig(meta_max_bytes=size - 1))
    assert [r.clip_id for r in result.records] == [good] and reasons(result) == {big: "malformed_meta"}
    assert str(path) in messages(result)[big] and f"over the {size - 1}-byte cap" in messages(result)[big]


def _patch_sizes(data: bytearray, entry: int, size: int, local_too: bool) -> None:
    """Set a member's uncompressed size (central entry at `entry`, and its local header)."""
    data[entry + 24 : entry + 28] = struct.pack("<L", size)
    if local_too:
        (offset,) = struct.unpack_from("<L", data, entry + 42)
        data[offset + 22 : offset + 26] = struct.pack("<L", size)


def test_meta_zip_member_is_capped_before_and_while_reading(tmp_path: Path) -> None:
    names = [make_vfhq_clip(tmp_path, f"m{i}", i, 12, split_folder=None) for i in range(4)]
    texts = [(tmp_path / "meta_info" / f"{n}.txt").read_bytes() for n in names]
    for n in names:
        (tmp_path / "meta_info" / f"{n}.txt").unlink()
    big = texts[2] + b"0" * (24 * 2**20)  # a real 24 MiB member, over the 16 MiB default cap
    path = tmp_path / "meta_info.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for n, text in zip(names, [texts[0], texts[1], big, texts[3]], strict=True):
            archive.writestr(f"meta_info/{n}.txt", text)
    data = bytearray(path.read_bytes())
    *_, directory = END.unpack_from(data, len(data) - END.size)[:-1]
    entries, pos = [], directory
    for _ in names:
        entries.append(pos)
        pos += CENTRAL.size + sum(struct.unpack_from("<3H", data, pos + 28))
    _patch_sizes(data, entries[0], 512 * 2**20, local_too=False)  # declares 512 MiB
    _patch_sizes(data, entries[1], 100, local_too=True)  # declares 100 bytes, holds more
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        result = scan_vfhq(tmp_path, VfhqConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.clip_id for r in result.records] == [names[3]]
    failed, said = reasons(result), messages(result)
    assert failed == {n: "malformed_meta" for n in names[:3]}
    assert f"{path}:meta_info/{names[0]}.txt" in said[names[0]] and "16777216-byte cap" in said[names[0]]
    assert "CRC" in said[names[1]]
    assert "16777216-byte cap" in said[names[2]]
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------
# Clip ids


def test_colliding_clip_ids_fail_both_and_the_rest_build(tmp_path: Path) -> None:
    a = make_vfhq_clip(tmp_path, "a.b", 0, 20, identity=0)
    b = make_vfhq_clip(tmp_path, "a b", 0, 20, identity=1, out_folder="second")
    c = make_vfhq_clip(tmp_path, "c", 1, 20, identity=2)
    scan = scan_vfhq(tmp_path, VfhqConfig())
    assert len(scan.records) == 3
    manifest, failures = build_manifest(scan, BuildConfig(dataset="vfhq", min_frames=10))
    assert set(manifest["clip_id"]) == {c}
    assert {f.clip_id: f.error for f in failures} == {a: "id_collision", b: "id_collision"}
    said = {f.clip_id: f.message for f in failures}
    assert repr(b) in said[a] and repr(a) in said[b] and "vfhq__Clip+a_b+P0+C0" in said[a]


# ---------------------------------------------------------------------------------------------------
# CelebV-HQ info entries


@pytest.fixture
def raw_root(tmp_path: Path) -> Path:
    make_raw_video(tmp_path, "r1", 60, identity=0)
    return tmp_path


def _scan_with(root: Path, entries: dict[str, dict], text: str | None = None):
    write_info(root, entries)
    if text is not None:
        (root / "celebvhq_info.json").write_text(text)
    return scan_celebvhq(root, CelebvhqConfig())


def test_info_values_of_the_wrong_type_or_not_finite_fail_their_clip(raw_root: Path) -> None:
    def entry(**changes) -> dict:
        base = info_entry("r1", 0.0, 1.2, STANDARD_BBOX)
        for key, value in changes.items():
            if key in ("appearance", "action", "emotion"):
                base["attributes"][key] = value
            else:
                base[key] = value
        return base

    bad = {
        "nan_start": entry(duration={"start_sec": float("nan"), "end_sec": 1.0}),
        "inf_end": entry(duration={"start_sec": 0.0, "end_sec": float("inf")}),
        "duration_list": entry(duration=[0, 1]),
        "attributes_list": entry(attributes=[1, 0]),
        "attributes_str": entry(attributes="happy"),
        "appearance_int": entry(appearance=5),
        "action_strs": entry(action=["x", "y"]),
        "emotion_int": entry(emotion=3),
        "emotion_labels_dict": entry(emotion={"labels": {"emotion": "happy"}}),
        "nan_bbox": entry(bbox={**STANDARD_BBOX, "top": float("nan")}),
        "inf_bbox": entry(bbox={**STANDARD_BBOX, "right": float("inf")}),
    }
    entries = {"r1_good": entry(), **bad}
    result = _scan_with(raw_root, entries)  # json.dumps writes the NaN / Infinity literals
    assert "NaN" in (raw_root / "celebvhq_info.json").read_text()
    assert [r.clip_id for r in result.records] == ["r1_good"]
    assert reasons(result) == {clip_id: "malformed_meta" for clip_id in bad}
    assert all("celebvhq_info.json[" in m for m in messages(result).values())


def test_bbox_mostly_outside_the_frame_or_tiny_fails(raw_root: Path) -> None:
    entries = {
        "r1_good": info_entry("r1", 0.0, 1.2, STANDARD_BBOX),
        "r1_above": info_entry("r1", 0.0, 1.2, {"top": -0.5, "bottom": 0.01, "left": 0.2, "right": 0.6}),
        "r1_tiny": info_entry("r1", 0.0, 1.2, {"top": 0.5, "bottom": 0.52, "left": 0.5, "right": 0.52}),
    }
    result = _scan_with(raw_root, entries)
    assert [r.clip_id for r in result.records] == ["r1_good"]
    assert reasons(result) == {"r1_above": "malformed_meta", "r1_tiny": "malformed_meta"}
    assert "under half of it lies inside the frame" in messages(result)["r1_above"]
    assert "celebvhq.min_crop_pixels" in messages(result)["r1_tiny"]


@pytest.mark.parametrize("ytb_id", ["../outside", "a/b", "a\\b", "x\x00y", ".."])
def test_ytb_id_that_is_not_a_plain_name_is_refused(raw_root: Path, ytb_id: str) -> None:
    (raw_root / "outside.mp4").write_bytes((raw_root / "raw" / "r1.mp4").read_bytes())
    entries = {
        "r1_good": info_entry("r1", 0.0, 1.2, STANDARD_BBOX),
        "evil_0": info_entry(ytb_id, 0.0, 1.2, STANDARD_BBOX),
    }
    result = _scan_with(raw_root, entries)
    assert [r.clip_id for r in result.records] == ["r1_good"]
    assert (
        reasons(result) == {"evil_0": "malformed_meta"}
        and "not a plain file name" in messages(result)["evil_0"]
    )


def test_duplicate_clip_ids_in_the_info_file_are_counted(raw_root: Path) -> None:
    first = json.dumps(info_entry("r1", 0.0, 1.2, STANDARD_BBOX))
    last = json.dumps(info_entry("r1", 0.4, 1.2, STANDARD_BBOX))
    text = f'{{"meta_info": {{}}, "clips": {{"r1_0": {first}, "r1_0": {last}, "r1_1": {first}}}}}'
    result = _scan_with(raw_root, {}, text)
    assert result.counters == {"duplicate_clip_ids": 1}
    assert {r.clip_id: r.frame_offset for r in result.records} == {"r1_0": 10, "r1_1": 0}  # the last wins
