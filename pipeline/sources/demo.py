"""The demo dataset: VFHQ and CelebV-HQ look-alikes, in their official on-disk layouts, generated at run
time from one real face.

`skimage.data.astronaut()` is the only face that ships with our dependencies. Identities differ by
mirroring, hue, skin tone and face shape; clips add head motion (rotation, translation, scale) and
local warps that close the eyes and open the mouth, so frames move the way talking heads do.
Nothing generated is committed: `scan_demo` writes the folders on first use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import uuid
import zipfile
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from pipeline.config import CelebvhqConfig, DemoConfig, VfhqConfig
from pipeline.sources.base import ScanResult
from pipeline.sources.celebvhq import official_crop, scan_celebvhq
from pipeline.sources.vfhq import scan_vfhq
from pipeline.video import encode_mp4

log = logging.getLogger(__name__)

FPS = 25.0
MARKER = "demo.json"
# Landmarks of the astronaut image (x, y): eyes, nose tip, mouth corners; and the face box.
LANDMARKS = np.array([[204, 100], [249, 100], [228, 124], [212, 146], [246, 146]], np.float64)
FACE_BOX = np.array([175, 60, 282, 180], np.float64)
VFHQ_CANVAS = (384, 288)  # w, h: a full frame with the face off-centre


@dataclasses.dataclass
class Identity:
    image: np.ndarray  # RGB uint8
    landmarks: np.ndarray  # (5, 2)
    face_box: np.ndarray  # (4,) x0, y0, x1, y1


def make_identity(index: int) -> Identity:
    """A visibly different person per index, derived from the astronaut photo."""
    image = skimage.data.astronaut().copy()
    landmarks, box = LANDMARKS.copy(), FACE_BOX.copy()
    size = image.shape[1]
    if index % 2:
        image = image[:, ::-1].copy()
        landmarks[:, 0] = size - 1 - landmarks[:, 0]
        landmarks[[0, 1, 3, 4]] = landmarks[[1, 0, 4, 3]]
        box[[0, 2]] = size - 1 - box[[2, 0]]
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + 23 * index) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = 0.7 + 0.15 * (index % 4)  # skin tone: darker or lighter
    image = (255.0 * (image / 255.0) ** gamma).astype(np.uint8)
    # Face shape: stretch the whole image about the face centre (wider / longer faces).
    sx, sy = 0.85 + 0.07 * (index % 5), 1.12 - 0.05 * (index % 4)
    centre = (box[:2] + box[2:]) / 2
    matrix = np.array([[sx, 0, centre[0] * (1 - sx)], [0, sy, centre[1] * (1 - sy)]])
    image = cv2.warpAffine(image, matrix, (size, size), borderMode=cv2.BORDER_REFLECT)
    landmarks = landmarks @ matrix[:, :2].T + matrix[:, 2]
    corners = np.array([[box[0], box[1]], [box[2], box[3]]]) @ matrix[:, :2].T + matrix[:, 2]
    return Identity(image, landmarks, corners.reshape(-1))


def recolour(identity: Identity, hue_shift: int) -> Identity:
    """The identity under other light: every pixel's hue rotated by `hue_shift` (OpenCV units, of 180)."""
    if hue_shift == 0:
        return identity
    hsv = cv2.cvtColor(identity.image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue_shift) % 180
    return dataclasses.replace(identity, image=cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def _local_warp(image: np.ndarray, identity: Identity, blink: float, mouth: float) -> np.ndarray:
    """Close the eyes by `blink` (0..1) and open the mouth by `mouth` (0..1) with Gaussian remaps."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_y = ys.copy()
    for ex, ey in identity.landmarks[:2]:
        weight = np.exp(-(((xs - ex) / 10.0) ** 2 + ((ys - ey) / 7.0) ** 2))
        map_y += blink * 0.9 * (ys - ey) * weight  # sample farther out: the lid closes
    mouth_x = identity.landmarks[3:, 0].mean()
    mouth_y = identity.landmarks[3:, 1].mean()
    weight = np.exp(-(((xs - mouth_x) / 22.0) ** 2 + ((ys - mouth_y) / 10.0) ** 2))
    map_y -= mouth * 0.6 * (ys - mouth_y) * weight  # sample closer in: the lips part
    return cv2.remap(image, xs, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def render_clip(
    identity: Identity, num_frames: int, canvas: tuple[int, int], face_width: float, motion: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T,H,W,3), face boxes (T,4) and landmarks (T,5,2) of a talking, moving head."""
    rng = np.random.default_rng(seed)
    width, height = canvas
    base_scale = face_width / (identity.face_box[2] - identity.face_box[0])
    centre = (identity.face_box[:2] + identity.face_box[2:]) / 2
    home = np.array([width, height]) * (0.5 + rng.uniform(-0.12, 0.12, 2) * motion)
    phases = rng.uniform(0, 2 * np.pi, 6)
    periods = rng.uniform(18, 40, 6)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    boxes = np.empty((num_frames, 4), np.float64)
    points = np.empty((num_frames, 5, 2), np.float64)
    for t in range(num_frames):
        wave = np.sin(2 * np.pi * t / periods + phases)
        angle = 12 * motion * wave[0]
        scale = base_scale * (1 + 0.08 * motion * wave[1])
        shift = home + np.array([0.08 * width, 0.05 * height]) * motion * wave[2:4]
        blink = max(0.0, wave[4]) ** 4
        mouth = 0.5 * (1 + wave[5])
        warped = _local_warp(identity.image, identity, blink, mouth)
        matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
        matrix[:, 2] += shift - centre
        frames[t] = cv2.warpAffine(warped, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = identity.face_box
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) @ matrix[:, :2].T + matrix[:, 2]
        boxes[t] = [*corners.min(0), *corners.max(0)]
        points[t] = identity.landmarks @ matrix[:, :2].T + matrix[:, 2]
    return frames, boxes, points


APPEARANCE = [
    "blurry",
    "male",
    "young",
    "chubby",
    "pale_skin",
    "rosy_cheeks",
    "oval_face",
    "receding_hairline",
    "bald",
    "bangs",
    "black_hair",
    "blonde_hair",
    "gray_hair",
    "brown_hair",
    "straight_hair",
    "wavy_hair",
    "long_hair",
    "arched_eyebrows",
    "bushy_eyebrows",
    "bags_under_eyes",
    "eyeglasses",
    "sunglasses",
    "narrow_eyes",
    "big_nose",
    "pointy_nose",
    "high_cheekbones",
    "big_lips",
    "double_chin",
    "no_beard",
    "5_o_clock_shadow",
    "goatee",
    "mustache",
    "sideburns",
    "heavy_makeup",
    "wearing_earrings",
    "wearing_hat",
    "wearing_lipstick",
    "wearing_necklace",
    "wearing_necktie",
    "wearing_mask",
]
ACTION = [
    "blow",
    "chew",
    "close_eyes",
    "cough",
    "cry",
    "drink",
    "eat",
    "frown",
    "gaze",
    "glare",
    "head_wagging",
    "kiss",
    "laugh",
    "listen_to_music",
    "look_around",
    "make_a_face",
    "nod",
    "play_instrument",
    "read",
    "shake_head",
    "shout",
    "sigh",
    "sing",
    "sleep",
    "smile",
    "smoke",
    "sneer",
    "sneeze",
    "sniff",
    "talk",
    "turn",
    "weep",
    "whisper",
    "wink",
    "yawn",
]
EMOTIONS = ("neutral", "happy", "anger", "sadness", "contempt", "fear", "disgust", "surprise")
LAYOUT_VERSION = 2  # the official layouts (meta_info/VFHQ-*, <ytid>/<clip>/, raw/ + processed/)
CELEB_RAW_CANVAS = (320, 240)  # a whole source video: the face is a part of the frame


def _png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def write_vfhq_clip(
    root: Path,
    name: str,
    frames: np.ndarray,
    boxes: np.ndarray,
    points: np.ndarray,
    split_folder: str,
    rows_from_start: bool,
    group_zip: Path | None,
) -> None:
    """One clip as VFHQ ships and extracts it. `frames` are the source frames start..end-1 of
    `Clip+...+F<start>-<end>`. Meta: meta_info/<split_folder>/<name>.txt, rows keyed by absolute index
    (from start, or from start+1), CROP last. Frames: the official extraction (start+1..end-1 as
    00000001.png..., cropped to CROP) under extracted_cropped_face_results/<ytid>/<name>/, or full frames
    as <name>/<frame> entries of a multi-clip zip."""
    start = int(name.rsplit("+F", 1)[1].split("-")[0])
    ytid = name.split("+")[1]
    height, width = frames.shape[1:3]
    x0, y0 = np.floor(boxes[:, :2].min(0) - 8).clip(0).astype(int)
    x1, y1 = np.ceil(boxes[:, 2:].max(0) + 8).astype(int)
    crop = (int(x0), int(y0), int(min(x1, width)), int(min(y1, height)))
    lines = [f"Video: {ytid}", f"H: {height}", f"W: {width}", f"FPS: {FPS:g}", ""]
    lines += ["FRAME INDEX PERSON ID BBOX (x0 y0 w h) FACIAL LANDMARKS (x1 y1 ... x5 y5)", ""]
    first_row = 0 if rows_from_start else 1
    for t in range(first_row, len(frames)):
        bx0, by0, bx1, by1 = boxes[t]
        marks = " ".join(f"{v:.2f}" for v in points[t].reshape(-1))
        lines.append(f"{start + t} 0 {bx0:.1f} {by0:.1f} {bx1 - bx0:.1f} {by1 - by0:.1f} {marks}")
    lines.append(f"CROP: {crop[0]} {crop[1]} {crop[2]} {crop[3]}")
    meta_dir = root / "meta_info" / split_folder
    meta_dir.mkdir(parents=True, exist_ok=True)
    (meta_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    extracted = frames[1:]  # start+1 .. end-1, numbered from 1
    if group_zip is not None:
        with zipfile.ZipFile(group_zip, "a", zipfile.ZIP_STORED) as archive:
            for k, frame in enumerate(extracted, 1):
                archive.writestr(f"{name}/{k:08d}.png", _png(frame))
        return
    folder = root / "extracted_cropped_face_results" / ytid / name
    folder.mkdir(parents=True)
    cx0, cy0, cx1, cy1 = crop
    for k, frame in enumerate(extracted, 1):
        (folder / f"{k:08d}.png").write_bytes(_png(frame[cy0:cy1, cx0:cx1]))


def _bbox_fractions(boxes: np.ndarray, width: int, height: int) -> dict[str, float]:
    x0, y0 = boxes[:, :2].min(0)
    x1, y1 = boxes[:, 2:].max(0)
    return {
        "top": round(max(y0 / height, 0.0), 4),
        "bottom": round(min(y1 / height, 1.0), 4),
        "left": round(max(x0 / width, 0.0), 4),
        "right": round(min(x1 / width, 1.0), 4),
    }


def _info_entry(ytb_id: str, first: int, stop: int, bbox: dict[str, float], index: int) -> dict:
    appearance = [1 if (i + index) % 7 == 0 else 0 for i in range(len(APPEARANCE))]
    action = [1 if i in (index % 5, 29) else 0 for i in range(len(ACTION))]  # 29: talk
    if index % 3 == 2:  # an emotion that changes within the clip
        middle = (first + stop) / 2 / FPS
        labels: object = [
            {"emotion": EMOTIONS[index % 8], "start_sec": first / FPS, "end_sec": middle},
            {"emotion": "happy", "start_sec": middle, "end_sec": stop / FPS},
        ]
        emotion = {"sep_flag": True, "labels": labels}
    else:
        emotion = {"sep_flag": False, "labels": EMOTIONS[index % 8]}
    return {
        "ytb_id": ytb_id,
        "duration": {"start_sec": first / FPS, "end_sec": stop / FPS},
        "bbox": bbox,
        "attributes": {"appearance": appearance, "action": action, "emotion": emotion},
        "version": "v0.1",
    }


def write_celebvhq_video(
    root: Path,
    ytb_id: str,
    clip_ids: list[str],
    frames: np.ndarray,
    boxes: np.ndarray,
    spans: list[tuple[int, int]],
) -> dict[str, dict]:
    """A whole source video raw/<ytb_id>.mp4 holding the clips at frame spans [first, stop); returns
    their info entries. The first clip of a video is also processed as the official script would
    (processed/<clip_id>.mp4): a user may have both."""
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "raw" / f"{ytb_id}.mp4").write_bytes(encode_mp4(frames, FPS))
    height, width = frames.shape[1:3]
    entries = {}
    for n, (clip_id, (first, stop)) in enumerate(zip(clip_ids, spans, strict=True)):
        bbox = _bbox_fractions(boxes[first:stop], width, height)
        entries[clip_id] = _info_entry(ytb_id, first, stop, bbox, int(clip_id.rsplit("_", 1)[1]))
        if n == 0:
            x0, y0, x1, y1 = official_crop(
                (bbox["top"], bbox["bottom"], bbox["left"], bbox["right"]), width, height
            )
            cut = np.ascontiguousarray(frames[first:stop, y0:y1, x0:x1])
            (root / "processed").mkdir(exist_ok=True)
            (root / "processed" / f"{clip_id}.mp4").write_bytes(encode_mp4(cut, FPS))
    return entries


def generate_demo(root: Path, config: DemoConfig) -> None:
    """Write the demo dataset under root/vfhq and root/celebvhq (in a temp folder, then renamed), in the
    layouts the datasets' official scripts leave on disk."""
    if root.exists():
        if not (root / MARKER).is_file():
            raise FileExistsError(f"{root} exists and is not a demo dataset; pick another ROOT")
        shutil.rmtree(root)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    vfhq, celeb = tmp / "vfhq", tmp / "celebvhq"
    (vfhq / "zips").mkdir(parents=True)
    celeb.mkdir()
    identities = [make_identity(i) for i in range(config.identities)]
    rng = np.random.default_rng(config.seed)
    hue_rng = np.random.default_rng(config.seed + 1)  # its own stream: clip lengths stay as they were

    def length() -> int:
        return int(rng.integers(config.min_frames, config.max_frames + 1))

    def person(index: int) -> Identity:
        """Identity `index` in this clip's light."""
        if config.clip_hue_shift == 0:
            return identities[index]
        shift = int(hue_rng.integers(-config.clip_hue_shift, config.clip_hue_shift + 1))
        return recolour(identities[index], shift)

    for c in range(config.vfhq_clips):
        ident = c % config.identities
        num = length() + 1  # the extraction keeps end-start-1 of the source frames
        frames, boxes, points = render_clip(
            person(ident), num, VFHQ_CANVAS, 80, config.motion, config.seed + c
        )
        start = 100 * c + 3
        name = f"Clip+_-dm{ident}_v-{ident}+P0+C{c}+F{start}-{start + num}"
        split_folder = "VFHQ-Test" if c == config.vfhq_clips - 1 else "VFHQ-Train"
        group = vfhq / "zips" / "group0.zip" if c % 3 == 2 else None
        write_vfhq_clip(vfhq, name, frames, boxes, points, split_folder, c % 2 == 0, group)
    entries: dict[str, dict] = {}
    for video in range((config.celebvhq_clips + 1) // 2):
        clip_numbers = [n for n in (2 * video, 2 * video + 1) if n < config.celebvhq_clips]
        lengths = [length() for _ in clip_numbers]
        gap = 7
        spans, cursor = [], gap
        for count in lengths:
            spans.append((cursor, cursor + count))
            cursor += count + gap
        ident = (video + 3) % config.identities
        seed = config.seed + 1000 + video
        frames, boxes, _ = render_clip(
            person(ident), cursor, CELEB_RAW_CANVAS, 110, 0.5 * config.motion, seed
        )
        ytb_id = f"dm{video}_c-{ident}"
        clip_ids = [f"{ytb_id}_{n}" for n in clip_numbers]
        entries.update(write_celebvhq_video(celeb, ytb_id, clip_ids, frames, boxes, spans))
    info = {"meta_info": {"appearance_mapping": APPEARANCE, "action_mapping": ACTION}, "clips": entries}
    (celeb / "celebvhq_info.json").write_text(json.dumps(info, indent=1))
    (tmp / MARKER).write_text(_marker(config))
    tmp.rename(root)


def _marker(config: DemoConfig) -> str:
    return json.dumps({"layout": LAYOUT_VERSION, **dataclasses.asdict(config)}, sort_keys=True)


def scan_demo(root: Path, config: DemoConfig) -> ScanResult:
    """Generate the demo dataset if it is missing or was made with other settings, then read both parts."""
    marker = root / MARKER
    if not marker.is_file() or marker.read_text() != _marker(config):
        log.info("generating the demo dataset in %s", root)
        generate_demo(root, config)
    result = scan_vfhq(root / "vfhq", VfhqConfig(), dataset="demo-vfhq")
    result.extend(scan_celebvhq(root / "celebvhq", CelebvhqConfig(), dataset="demo-celebvhq"))
    return result
