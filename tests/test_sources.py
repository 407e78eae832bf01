from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lookalike import make_celebvhq, make_vfhq_clip

from pipeline.config import CelebvhqConfig, DemoConfig, VfhqConfig
from pipeline.sources.celebvhq import scan_celebvhq
from pipeline.sources.demo import make_identity, scan_demo
from pipeline.sources.vfhq import MetaError, parse_meta, scan_vfhq
from pipeline.video import read_image_frames, read_video_frames


def reasons(result) -> dict[str, str]:
    return {f.clip_id: f.error for f in result.failures}


def test_vfhq_reads_folders_and_zips(tmp_path: Path) -> None:
    folder = make_vfhq_clip(tmp_path, "yt1", 0, 20)
    zipped = make_vfhq_clip(tmp_path, "yt2", 1, 24, as_zip=True)
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert result.failures == []
    records = {r.clip_id: r for r in result.records}
    assert records[folder].source_kind == "frames" and records[folder].num_frames == 20
    assert records[zipped].source_kind == "zip" and records[zipped].num_frames == 24
    assert records[folder].identity == "yt1+P0"
    assert (records[folder].width, records[folder].height) == (192, 144)
    boxes = np.asarray(records[folder].face_boxes)
    assert boxes.shape == (20, 4) and (boxes[:, 2] > boxes[:, 0]).all()


def test_vfhq_meta_fields(tmp_path: Path) -> None:
    name = make_vfhq_clip(tmp_path, "abc", 3, 12)
    meta = parse_meta(tmp_path / "meta_info" / f"{name}.txt")
    assert (meta.ytid, meta.person, meta.fps, meta.width, meta.height) == ("abc", 0, 25.0, 192, 144)
    assert len(meta.boxes) == 12 and len(meta.crop) == 4


def truncate(path: Path, keep: float) -> None:
    text = path.read_text()
    path.write_text(text[: int(len(text) * keep)])


def test_vfhq_bad_clips_become_failures_with_reasons(tmp_path: Path) -> None:
    good = make_vfhq_clip(tmp_path, "good", 0, 16)
    truncated = make_vfhq_clip(tmp_path, "trunc", 1, 16)
    truncate(tmp_path / "meta_info" / f"{truncated}.txt", 0.6)
    no_frames = make_vfhq_clip(tmp_path, "noframes", 2, 16)
    for png in (tmp_path / "frames" / no_frames).iterdir():
        png.unlink()
    (tmp_path / "frames" / no_frames).rmdir()
    orphan = make_vfhq_clip(tmp_path, "orphan", 3, 16)
    (tmp_path / "meta_info" / f"{orphan}.txt").unlink()
    garbage = "Clip+junk+P0+C4+F0-16"
    (tmp_path / "meta_info" / f"{garbage}.txt").write_text("\x00\x01 this is not a meta file\n1 2 3\n")
    badname = tmp_path / "meta_info" / "notaclip.txt"
    badname.write_text("Video: x\n")

    result = scan_vfhq(tmp_path, VfhqConfig())
    assert [r.clip_id for r in result.records] == [good]
    assert reasons(result) == {
        truncated: "malformed_meta",
        no_frames: "missing_frames",
        orphan: "missing_meta",
        garbage: "malformed_meta",
        "notaclip": "malformed_meta",
    }
    messages = {f.clip_id: f.message for f in result.failures}
    assert "per frame row" in messages[truncated] or "CROP" in messages[truncated]
    assert "file name" in messages["notaclip"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.replace("FPS: 25\n", ""), "header lacks \\['FPS'\\]"),
        (lambda t: t.rsplit("CROP", 1)[0], "no CROP line"),
        (lambda t: "\n".join(t.splitlines()[:8] + t.splitlines()[-1:]), "frame rows, the name says"),
    ],
)
def test_vfhq_meta_errors_name_the_problem(tmp_path: Path, edit, match: str) -> None:
    name = make_vfhq_clip(tmp_path, "x", 0, 12)
    path = tmp_path / "meta_info" / f"{name}.txt"
    path.write_text(edit(path.read_text()))
    with pytest.raises(MetaError, match=match):
        parse_meta(path)


def test_vfhq_precropped_frames_drop_the_boxes(tmp_path: Path) -> None:
    name = make_vfhq_clip(tmp_path, "pre", 0, 10)
    path = tmp_path / "meta_info" / f"{name}.txt"
    path.write_text(path.read_text().replace("W: 192", "W: 1920").replace("H: 144", "H: 1080"))
    (record,) = scan_vfhq(tmp_path, VfhqConfig()).records
    assert record.face_boxes is None


def test_celebvhq_reads_clips_and_records_bad_ones(tmp_path: Path) -> None:
    make_celebvhq(tmp_path, {"aaa_0": ("aaa", 0, 20), "bbb_1": ("bbb", 1, 18), "ccc_2": ("ccc", 2, 16)})
    videos = tmp_path / "videos"
    (videos / "ccc_2.mp4").write_bytes(np.random.default_rng(0).bytes(5000))  # corrupt
    (videos / "stray_9.mp4").write_bytes((videos / "aaa_0.mp4").read_bytes())  # no json entry
    info = json.loads((tmp_path / "celebvhq_info.json").read_text())
    info["clips"]["gone_3"] = dict(info["clips"]["aaa_0"], ytb_id="gone")  # entry without a video
    info["clips"]["noid_4"] = {"duration": {}}  # entry without ytb_id
    (tmp_path / "celebvhq_info.json").write_text(json.dumps(info))

    result = scan_celebvhq(tmp_path, CelebvhqConfig())
    records = {r.clip_id: r for r in result.records}
    assert sorted(records) == ["aaa_0", "bbb_1"]
    assert records["aaa_0"].identity == "aaa" and records["aaa_0"].num_frames == 20
    assert records["aaa_0"].source_kind == "video" and records["aaa_0"].face_boxes is None
    assert reasons(result) == {
        "ccc_2": "unreadable_video",
        "stray_9": "missing_meta",
        "gone_3": "missing_video",
        "noid_4": "malformed_meta",
    }


@pytest.mark.parametrize(
    "content, match", [(None, "does not exist"), ("{not json", "not valid JSON"), ("[]", "no 'clips'")]
)
def test_celebvhq_unreadable_info_file_stops_the_scan(tmp_path: Path, content, match: str) -> None:
    from pipeline.sources.base import SourceError

    if content is not None:
        (tmp_path / "celebvhq_info.json").write_text(content)
    with pytest.raises(SourceError, match=match):
        scan_celebvhq(tmp_path, CelebvhqConfig())


def test_demo_generates_both_formats_once(tmp_path: Path) -> None:
    config = DemoConfig(identities=3, vfhq_clips=3, celebvhq_clips=2, min_frames=12, max_frames=16)
    root = tmp_path / "demo"
    result = scan_demo(root, config)
    assert result.failures == []
    datasets = sorted({r.dataset for r in result.records})
    assert datasets == ["demo-celebvhq", "demo-vfhq"] and len(result.records) == 5
    assert {r.source_kind for r in result.records} == {"frames", "zip", "video"}
    assert all(12 <= r.num_frames <= 16 for r in result.records)
    stamp = (root / "demo.json").stat().st_mtime_ns
    scan_demo(root, config)
    assert (root / "demo.json").stat().st_mtime_ns == stamp  # not generated again

    # The head moves and the face changes between frames (motion, blinks, mouth).
    vfhq = next(r for r in result.records if r.source_kind == "frames")
    frames = read_image_frames(Path(vfhq.source))
    boxes = np.asarray(vfhq.face_boxes)
    assert np.ptp(boxes[:, 0]) > 2 and np.abs(np.diff(frames.astype(int), axis=0)).mean() > 2
    celeb = next(r for r in result.records if r.source_kind == "video")
    assert read_video_frames(celeb.source).shape[1:] == (256, 256, 3)


def test_demo_identities_look_different() -> None:
    faces = [make_identity(i) for i in range(4)]
    crops = []
    for face in faces:
        x0, y0, x1, y1 = face.face_box.astype(int)
        crops.append(face.image[y0:y1, x0:x1].reshape(-1, 3).mean(0))
    distances = [np.abs(a - b).sum() for i, a in enumerate(crops) for b in crops[i + 1 :]]
    assert min(distances) > 20  # mean face colour differs clearly between every pair


def test_demo_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        scan_demo(
            tmp_path, DemoConfig(identities=1, vfhq_clips=1, celebvhq_clips=1, min_frames=4, max_frames=4)
        )
    assert (tmp_path / "mine.txt").read_text() == "precious"
