"""The demo dataset: VFHQ- and CelebV-HQ-format look-alikes generated at run time from one real face.

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
from pipeline.sources.celebvhq import scan_celebvhq
from pipeline.sources.vfhq import scan_vfhq
from pipeline.video import encode_mp4

log = logging.getLogger(__name__)

FPS = 25.0
MARKER = "demo.json"
# Landmarks of the astronaut image (x, y): eyes, nose tip, mouth corners; and the face box.
LANDMARKS = np.array([[204, 100], [249, 100], [228, 124], [212, 146], [246, 146]], np.float64)
FACE_BOX = np.array([175, 60, 282, 180], np.float64)
VFHQ_CANVAS = (384, 288)  # w, h: a full frame with the face off-centre
CELEB_CANVAS = (256, 256)  # a processed CelebV-HQ clip is already a face crop


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


def write_vfhq_clip(
    root: Path,
    config: VfhqConfig,
    name: str,
    frames: np.ndarray,
    boxes: np.ndarray,
    points: np.ndarray,
    as_zip: bool,
) -> None:
    """Write one clip in VFHQ's format: meta txt (header, rows, CROP) and PNG frames (folder or zip)."""
    start = int(name.rsplit("+F", 1)[1].split("-")[0])
    height, width = frames.shape[1:3]
    lines = [f"Video: {name.split('+')[1]}", f"H: {height}", f"W: {width}", f"FPS: {FPS:g}"]
    lines.append("FRAME INDEX PERSON ID BBOX (x0 y0 w h) FACIAL LANDMARKS (x1 y1 ... x5 y5)")
    for t, ((x0, y0, x1, y1), lms) in enumerate(zip(boxes, points, strict=True)):
        marks = " ".join(f"{v:.2f}" for v in lms.reshape(-1))
        lines.append(f"{start + t} 0 {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f} {marks}")
    cx0, cy0 = boxes[:, :2].min(0)
    cx1, cy1 = boxes[:, 2:].max(0)
    lines.append(f"CROP {cx0:.0f} {cy0:.0f} {cx1:.0f} {cy1:.0f}")
    (root / config.meta_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    pngs = [cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in frames]
    frames_root = root / config.frames_dir
    if as_zip:
        with zipfile.ZipFile(frames_root / f"{name}.zip", "w", zipfile.ZIP_STORED) as archive:
            for t, data in enumerate(pngs):
                archive.writestr(f"{name}/{t:08d}.png", data)
    else:
        folder = frames_root / name
        folder.mkdir()
        for t, data in enumerate(pngs):
            (folder / f"{t:08d}.png").write_bytes(data)


def write_celebvhq_dataset(
    root: Path, config: CelebvhqConfig, clips: dict[str, tuple[str, np.ndarray]]
) -> None:
    """Write clips {clip_id: (ytb_id, frames)} in CelebV-HQ's format: info json and processed mp4s."""
    (root / config.videos_dir).mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict] = {}
    for c, (clip_id, (ytb_id, frames)) in enumerate(sorted(clips.items())):
        (root / config.videos_dir / f"{clip_id}.mp4").write_bytes(encode_mp4(frames, FPS))
        entries[clip_id] = {
            "ytb_id": ytb_id,
            "duration": {"start_sec": 2.0 * c, "end_sec": 2.0 * c + len(frames) / FPS},
            "bbox": {"top": 0.1, "bottom": 0.6, "left": 0.3, "right": 0.7},
            "attributes": {"appearance": [], "action": [], "emotion": {}},
            "version": "v0.1",
        }
    meta_info = {"appearance_mapping": [], "action_mapping": [], "emotion_mapping": []}
    (root / config.info_file).write_text(json.dumps({"meta_info": meta_info, "clips": entries}, indent=1))


def generate_demo(root: Path, config: DemoConfig) -> None:
    """Write the demo dataset under root/vfhq and root/celebvhq (in a temp folder, then renamed)."""
    if root.exists():
        if not (root / MARKER).is_file():
            raise FileExistsError(f"{root} exists and is not a demo dataset; pick another ROOT")
        shutil.rmtree(root)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    vfhq_cfg, celeb_cfg = VfhqConfig(), CelebvhqConfig()
    (tmp / "vfhq" / vfhq_cfg.meta_dir).mkdir(parents=True)
    (tmp / "vfhq" / vfhq_cfg.frames_dir).mkdir()
    identities = [make_identity(i) for i in range(config.identities)]
    rng = np.random.default_rng(config.seed)

    def length() -> int:
        return int(rng.integers(config.min_frames, config.max_frames + 1))

    for c in range(config.vfhq_clips):
        ident = c % config.identities
        frames, boxes, points = render_clip(
            identities[ident], length(), VFHQ_CANVAS, 80, 1.0, config.seed + c
        )
        start = 100 * c
        name = f"Clip+demo{ident:02d}+P0+C{c}+F{start}-{start + len(frames)}"
        write_vfhq_clip(tmp / "vfhq", vfhq_cfg, name, frames, boxes, points, as_zip=c % 3 == 2)
    clips: dict[str, tuple[str, np.ndarray]] = {}
    for c in range(config.celebvhq_clips):
        ident = c % config.identities
        seed = config.seed + 1000 + c
        frames, _, _ = render_clip(identities[ident], length(), CELEB_CANVAS, 120, 0.5, seed)
        clips[f"demoid{ident:02d}_{c}"] = (f"demoid{ident:02d}", frames)
    write_celebvhq_dataset(tmp / "celebvhq", celeb_cfg, clips)
    (tmp / MARKER).write_text(json.dumps(dataclasses.asdict(config), sort_keys=True))
    tmp.rename(root)


def scan_demo(root: Path, config: DemoConfig) -> ScanResult:
    """Generate the demo dataset if it is missing or was made with other settings, then read both parts."""
    marker = root / MARKER
    wanted = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if not marker.is_file() or marker.read_text() != wanted:
        log.info("generating the demo dataset in %s", root)
        generate_demo(root, config)
    result = scan_vfhq(root / "vfhq", VfhqConfig(), dataset="demo-vfhq")
    result.extend(scan_celebvhq(root / "celebvhq", CelebvhqConfig(), dataset="demo-celebvhq"))
    return result
