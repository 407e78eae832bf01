"""Small VFHQ / CelebV-HQ look-alike downloads for tests, laid out from the datasets' documented facts
(shared/REFERENCE.md §3), not from what our readers or demo expect.

VFHQ: one meta txt per clip (header, rows keyed by absolute frame index, CROP line), frames extracted as
the official script does (frames start+1 .. end-1, `%08d.png` from 1, cropped to CROP, under
`<out>/<ytid>/<clip>/`), or full frames in `<clip>/`, `<clip>.zip` or multi-clip `group<N>.zip`.
CelebV-HQ: `celebvhq_info.json`, whole source videos `raw/<ytb_id>.mp4`, and clips cut and cropped the way
the official `process_ffmpeg` would (`processed/<clip_id>.mp4`).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.sources.demo import make_identity, render_clip
from pipeline.video import encode_mp4, read_video_frames

REPO = Path(__file__).resolve().parent.parent
FPS = 25.0
VFHQ_SIZE = (192, 144)  # w, h of a full source frame
APPEARANCE = [f"appearance_{i}" for i in range(40)]
ACTION = [f"action_{i}" for i in range(35)]


def vfhq_name(ytid: str, clip: int, start: int, end: int, pid: int = 0) -> str:
    return f"Clip+{ytid}+P{pid}+C{clip}+F{start}-{end}"


def png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


@dataclass
class VfhqClip:
    name: str
    start: int
    end: int
    frames: np.ndarray  # the source frames start .. end-1 (full size)
    boxes: np.ndarray  # (T, 4) x0, y0, x1, y1 of each source frame
    crop: tuple[int, int, int, int]

    def extracted(self, cropped: bool = True) -> list[np.ndarray]:
        """What the official extraction writes: frames start+1 .. end-1, cropped to CROP."""
        x0, y0, x1, y1 = self.crop
        frames = self.frames[1:]
        return [f[y0:y1, x0:x1] for f in frames] if cropped else list(frames)


def vfhq_meta_text(clip: VfhqClip, rows_from: int, crop_word: str = "CROP:") -> str:
    """Header, blank, column title, blank, rows keyed by absolute index from `rows_from`, CROP."""
    height, width = clip.frames.shape[1:3]
    ytid = clip.name.split("+")[1]
    lines = [f"Video: {ytid}", f"H: {height}", f"W: {width}", f"FPS: {FPS:g}", ""]
    lines += ["FRAME INDEX PID BBOX (x0 y0 w h) FACIAL LANDMARKS (x1 y1 ... x5 y5)", ""]
    for index in range(rows_from, clip.end):
        x0, y0, x1, y1 = clip.boxes[index - clip.start]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        marks = " ".join(
            f"{cx + dx:.3f} {cy + dy:.3f}" for dx, dy in [(-5, -4), (5, -4), (0, 0), (-4, 5), (4, 5)]
        )
        lines.append(f"{index} 0 {x0:.3f} {y0:.3f} {x1 - x0:.3f} {y1 - y0:.3f} {marks}")
    lines.append(f"{crop_word} {' '.join(str(v) for v in clip.crop)}")
    return "\n".join(lines) + "\n"


def render_vfhq_clip(
    ytid: str, clip: int, num_frames: int, identity: int = 0, start: int | None = None
) -> VfhqClip:
    """A clip whose official extraction yields `num_frames` frames (source frames start .. end-1)."""
    start = 100 * clip + 7 if start is None else start
    end = start + num_frames + 1
    frames, boxes, _ = render_clip(make_identity(identity), end - start, VFHQ_SIZE, 40, 1.0, seed=clip)
    # VFHQ's CROP is a generous region around the clip's faces: here twice the boxes' union, in the frame.
    width, height = VFHQ_SIZE
    low, high = boxes[:, :2].min(0), boxes[:, 2:].max(0)
    centre, half = (low + high) / 2, (high - low)
    x0, y0 = np.floor(centre - half).clip(0).astype(int)
    x1, y1 = np.ceil(centre + half).astype(int)
    crop = (int(x0), int(y0), int(min(x1, width)), int(min(y1, height)))
    return VfhqClip(vfhq_name(ytid, clip, start, end), start, end, frames, boxes, crop)


def make_vfhq_clip(
    root: Path,
    ytid: str,
    clip: int,
    num_frames: int,
    identity: int = 0,
    *,
    layout: str = "official",
    rows_from_start: bool = True,
    split_folder: str | None = "VFHQ-Train",
    out_folder: str = "extracted_cropped_face_results",
    as_zip: bool = False,
) -> str:
    """One VFHQ clip under root; returns its clip name.

    layout: official  `<out_folder>/<ytid>/<clip>/00000001.png ...` cropped to CROP
            folder    `<out_folder>/<clip>/` full frames;  zip: `<out_folder>/<clip>.zip` full frames
            group:<N> full frames as `<clip>/<frame>` in `<out_folder>/group<N>.zip` (added to)
            none      meta file only
    rows_from_start: meta rows run start..end-1 (else start+1..end-1).
    """
    if as_zip:
        layout = "zip"
    spec = render_vfhq_clip(ytid, clip, num_frames, identity)
    meta_dir = root / "meta_info" / split_folder if split_folder else root / "meta_info"
    meta_dir.mkdir(parents=True, exist_ok=True)
    rows_from = spec.start if rows_from_start else spec.start + 1
    (meta_dir / f"{spec.name}.txt").write_text(
        vfhq_meta_text(spec, rows_from, "CROP:" if clip % 2 else "CROP")
    )
    out = root / out_folder
    names = [f"{k:08d}.png" for k in range(1, num_frames + 1)]
    if layout == "official":
        folder = out / ytid / spec.name
        folder.mkdir(parents=True)
        for name, frame in zip(names, spec.extracted(cropped=True), strict=True):
            (folder / name).write_bytes(png(frame))
    elif layout == "folder":
        folder = out / spec.name
        folder.mkdir(parents=True)
        for name, frame in zip(names, spec.extracted(cropped=False), strict=True):
            (folder / name).write_bytes(png(frame))
    elif layout == "zip" or layout.startswith("group:"):
        out.mkdir(parents=True, exist_ok=True)
        if layout == "zip":
            path, prefix, mode = out / f"{spec.name}.zip", "", "w"
        else:
            path, prefix, mode = out / f"group{layout.split(':')[1]}.zip", f"{spec.name}/", "a"
        with zipfile.ZipFile(path, mode, zipfile.ZIP_STORED) as archive:
            for name, frame in zip(names, spec.extracted(cropped=False), strict=True):
                archive.writestr(f"{prefix}{name}", png(frame))
    elif layout != "none":
        raise ValueError(layout)
    return spec.name


def zip_meta_folder(root: Path) -> Path:
    """Replace root/meta_info by root/meta_info.zip holding `meta_info/<split>/<file>` entries."""
    folder = root / "meta_info"
    path = root / "meta_info.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*.txt")):
            archive.write(file, file.relative_to(root).as_posix())
    for file in sorted(folder.rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    folder.rmdir()
    return path


# ---------------------------------------------------------------------------------------------------
# CelebV-HQ


def official_square(bbox: dict[str, float], width: int, height: int) -> tuple[int, int, int, int]:
    """process_ffmpeg's crop: grow 0.02, clamp, round to pixels, square of side 2*(min(h,w)//2) about
    the centre; returned as (x0, y0, x1, y1). Tests pick boxes whose centres are whole pixels."""
    top, bottom = max(bbox["top"] - 0.02, 0), min(bbox["bottom"] + 0.02, 1)
    left, right = max(bbox["left"] - 0.02, 0), min(bbox["right"] + 0.02, 1)
    top, bottom, left, right = (
        round(top * height),
        round(bottom * height),
        round(left * width),
        round(right * width),
    )
    half = min(bottom - top, right - left) // 2
    cy, cx = (top + bottom) / 2, (left + right) / 2
    assert cy == int(cy) and cx == int(cx), "pick a bbox with a whole-pixel centre"
    return int(cx - half), int(cy - half), int(cx + half), int(cy + half)


def bbox_for_pixels(
    top: int, bottom: int, left: int, right: int, width: int, height: int
) -> dict[str, float]:
    """The info-file bbox (fractions, before the official 0.02 growth) of a grown box with these pixel
    edges; pick even edges with even sums so every rounding variant of the crop agrees."""
    return {
        "top": top / height + 0.02,
        "bottom": bottom / height - 0.02,
        "left": left / width + 0.02,
        "right": right / width - 0.02,
    }


STANDARD_BBOX = bbox_for_pixels(24, 168, 64, 192, 256, 192)  # a 128-px square at (64, 32) of a 256x192 frame


def official_cut(frames: np.ndarray, start_sec: float, end_sec: float, fps: float = FPS) -> np.ndarray:
    """The frames whose timestamps k/fps fall in [start_sec, end_sec)."""
    times = np.arange(len(frames)) / fps
    return frames[(times >= start_sec - 1e-9) & (times < end_sec - 1e-9)]


@dataclass
class RawVideo:
    ytb_id: str
    frames: np.ndarray  # the whole source video


def make_raw_video(
    root: Path, ytb_id: str, num_frames: int, identity: int, size: tuple[int, int] = (256, 192)
) -> RawVideo:
    """raw/<ytb_id>.mp4: a whole source video, a moving face in a wider frame."""
    frames, _, _ = render_clip(make_identity(identity), num_frames, size, 56, 0.6, seed=identity)
    (root / "raw").mkdir(parents=True, exist_ok=True)
    data = encode_mp4(frames, FPS)
    (root / "raw" / f"{ytb_id}.mp4").write_bytes(data)
    return RawVideo(ytb_id, read_video_frames(data))  # the decoded pixels: what any reader sees


def info_entry(
    ytb_id: str,
    start_sec: float,
    end_sec: float,
    bbox: dict[str, float],
    emotion: object = "happy",
    flags: int = 0,
) -> dict:
    appearance = [1 if i in (flags, flags + 3) else 0 for i in range(40)]
    action = [1 if i == flags else 0 for i in range(35)]
    if isinstance(emotion, list):
        emotion_field = {"sep_flag": True, "labels": emotion}
    else:
        emotion_field = {"sep_flag": False, "labels": emotion}
    return {
        "ytb_id": ytb_id,
        "duration": {"start_sec": start_sec, "end_sec": end_sec},
        "bbox": bbox,
        "attributes": {"appearance": appearance, "action": action, "emotion": emotion_field},
        "version": "v0.1",
    }


def write_info(root: Path, clips: dict[str, dict]) -> None:
    meta_info = {"appearance_mapping": APPEARANCE, "action_mapping": ACTION}
    root.mkdir(parents=True, exist_ok=True)
    (root / "celebvhq_info.json").write_text(json.dumps({"meta_info": meta_info, "clips": clips}))


def write_processed(
    root: Path, clip_id: str, raw: RawVideo, entry: dict, folder: str = "processed"
) -> np.ndarray:
    """processed/<clip_id>.mp4 as the official processing makes it; returns the frames written."""
    height, width = raw.frames.shape[1:3]
    x0, y0, x1, y1 = official_square(entry["bbox"], width, height)
    duration = entry["duration"]
    cut = official_cut(raw.frames, duration["start_sec"], duration["end_sec"])[:, y0:y1, x0:x1]
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / f"{clip_id}.mp4").write_bytes(encode_mp4(np.ascontiguousarray(cut), FPS))
    return cut


def make_celebvhq(root: Path, clips: dict[str, tuple[str, int, int]]) -> None:
    """Processed CelebV-HQ clips {clip_id: (ytb_id, identity, num_frames)}: each cut from its own raw
    video by the official processing (the raw videos are not kept)."""
    entries = {}
    for i, (clip_id, (ytb_id, ident, n)) in enumerate(clips.items()):
        raw = make_raw_video(root / ".tmp-raw", ytb_id, n + 10, ident)
        entry = info_entry(ytb_id, 0.2, 0.2 + n / FPS, STANDARD_BBOX, flags=i)
        write_processed(root, clip_id, raw, entry)
        entries[clip_id] = entry
    for path in sorted((root / ".tmp-raw").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / ".tmp-raw").rmdir()
    write_info(root, entries)


def frames_equal_enough(a: np.ndarray, b: np.ndarray, tol: float = 3.0) -> bool:
    """Mean absolute difference under `tol` grey levels (H.264 round trips are not bit-exact)."""
    return a.shape == b.shape and float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()) < tol


def ceil_frames(seconds: float, fps: float = FPS) -> int:
    return math.ceil(seconds * fps - 1e-6)
