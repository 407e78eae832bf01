from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import DemoConfig
from pipeline.sources.demo import make_identity, scan_demo
from pipeline.video import read_image_frames, read_video_frames


def reasons(result) -> dict[str, str]:
    return {f.clip_id: f.error for f in result.failures}


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

    # The official layouts: meta_info/VFHQ-Train|Test, <ytid>/<clip>/ from 00000001.png, a group zip;
    # raw/<ytb_id>.mp4 holding two clips, the first also processed/<clip_id>.mp4.
    assert {r.split_hint for r in result.records if r.dataset == "demo-vfhq"} == {"train", "test"}
    vfhq = next(r for r in result.records if r.source_kind == "frames")
    assert Path(vfhq.source).parent.name == vfhq.clip_id.split("+")[1]
    assert sorted(p.name for p in Path(vfhq.source).iterdir())[0] == "00000001.png"
    # The head moves and the face changes between frames (motion, blinks, mouth).
    frames = read_image_frames(Path(vfhq.source))
    boxes = np.asarray(vfhq.face_boxes)
    assert np.ptp(boxes[:, 0]) > 2 and np.abs(np.diff(frames.astype(int), axis=0)).mean() > 2
    processed, raw = sorted((r for r in result.records if r.source_kind == "video"), key=lambda r: r.clip_id)
    assert Path(processed.source).parent.name == "processed" and processed.width == processed.height
    assert (
        Path(raw.source).name == f"{raw.identity}.mp4" and raw.crop_box is not None and raw.frame_offset > 0
    )
    assert read_video_frames(processed.source).shape[1:] == (processed.height, processed.width, 3)
    assert raw.labels and raw.labels["action"] and len(raw.labels["emotion"]) >= 1


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


def test_demo_clips_of_one_person_get_their_own_colours_when_asked(tmp_path: Path) -> None:
    # motion 0: two clips of one person differ only in the eye and mouth warps, and in colour when
    # clip_hue_shift rotates each clip's hue
    def colour_difference(shift: int) -> float:
        config = DemoConfig(identities=1, vfhq_clips=2, celebvhq_clips=1, min_frames=12, max_frames=16,
                            clip_hue_shift=shift, motion=0.0)  # fmt: skip
        scan_demo(tmp_path / f"shift{shift}", config)
        folders = sorted((tmp_path / f"shift{shift}" / "vfhq" / "extracted_cropped_face_results").glob("*/*"))
        first, second = (read_image_frames(folder, 0, 1)[0] for folder in folders)
        lab = [cv2.cvtColor(frame, cv2.COLOR_RGB2LAB).astype(np.float64) for frame in (first, second)]
        return float(np.abs(lab[0][..., 1:] - lab[1][..., 1:]).mean())  # a*, b*: colour, not brightness

    assert colour_difference(0) < 0.5
    assert colour_difference(90) > 2.0


def test_demo_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="clip_hue_shift"):
        DemoConfig(clip_hue_shift=91)
    with pytest.raises(ValueError, match="motion"):
        DemoConfig(motion=-1.0)
