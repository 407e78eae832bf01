"""Face masks: per-frame face region from facexlib face parsing (ParseNet or BiSeNet), or the
authors' rectangle rule (`mode="box"`) for comparison.

`FaceParser` (model loading, batched inference, label tables) is shared with the foreground stage's
parsing backend, so both read weights and run the network the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.rows import Row, update_json_field
from pipeline.stages.base import Stage, register_stage
from pipeline.stages.device import limit_torch_memory, resolve_device
from pipeline.weights import MissingWeights, file_id, load_weight_specs, register_tiny_writer

log = logging.getLogger(__name__)

PARSING_MODELS = ("parsenet", "bisenet")
# The file name facexlib derives from its download URL: a file of this name inside `model_rootpath`
# is loaded as is; any other name would make facexlib try to download.
FACEXLIB_FILES = {"parsenet": "parsing_parsenet.pth", "bisenet": "parsing_bisenet.pth"}
# The two networks were trained on different label orders (facexlib's inference scripts): BiSeNet
# uses the face-parsing.PyTorch order, ParseNet the CelebAMask-HQ order of PSFRGAN.
PARSING_LABELS = {
    "bisenet": (
        "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
        "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
    ),
    "parsenet": (
        "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
        "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
    ),
}  # fmt: skip
# The face without hair, ears, earrings or neck: what carries expression and gaze. Ears and neck are
# left out because they carry identity (ear shape, jewellery, neck line) and pose little expression,
# and they flicker in and out under hair from frame to frame.
FACE_LABELS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "nose", "mouth", "u_lip", "l_lip")
# Input normalisation each network was trained with (facexlib's inference scripts).
NORMALISATION = {
    "parsenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "bisenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def label_ids(model: str, labels: Iterable[str | int]) -> list[int]:
    """Label names (model-independent) or ids (in `model`'s own order) -> ids in `model`'s order."""
    names = PARSING_LABELS[model]
    ids = []
    for label in labels:
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"labels: unknown parsing label {label!r}; known: {list(names)}")
            ids.append(names.index(label))
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(names):
            ids.append(int(label))
        else:
            raise ValueError(f"labels: expected a label name or an id in [0, {len(names)}), got {label!r}")
    if not ids:
        raise ValueError("labels: expected at least one parsing label")
    return sorted(set(ids))


def check_int(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class FaceParser:
    """A facexlib parsing network loaded once; `parse` turns frames into per-pixel label ids.

    The weights are read from `<weights_dir>/<configs/weights.yaml path>` by facexlib's own
    `init_parsing_model`, given that file's folder as `model_rootpath`: facexlib loads a file that is
    there and downloads only when it is missing, so a missing file is refused here first.
    """

    def __init__(
        self,
        weights_dir: str | Path,
        model: str,
        device: str,
        input_size: int,
        frame_batch: int,
        frame_step: int,
    ):
        if model not in PARSING_MODELS:
            raise ValueError(f"model must be one of {PARSING_MODELS}, got {model!r}")
        self.model = model
        self.input_size = check_int("input_size", input_size, 32)
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.frame_batch = check_int("frame_batch", frame_batch, 1)
        self.frame_step = check_int("frame_step", frame_step, 1)
        self.device = resolve_device(device)
        self.path = Path(weights_dir) / load_weight_specs()[model].path
        if self.path.name != FACEXLIB_FILES[model]:
            raise ValueError(
                f"configs/weights.yaml names {self.path.name!r} for {model}; facexlib only reads "
                f"{FACEXLIB_FILES[model]!r} (any other name makes it download)"
            )
        if not self.path.is_file():
            raise MissingWeights(f"{model}: missing {self.path} (see configs/weights.yaml for its origin)")
        from facexlib.parsing import init_parsing_model

        try:
            self.net = init_parsing_model(
                model_name=model, device=str(self.device), model_rootpath=str(self.path.parent)
            )
        except Exception as exc:  # unreadable pickle, wrong keys or shapes: name the file
            raise RuntimeError(f"cannot load {model} weights from {self.path}: {exc}") from exc
        self.weights_id = file_id(self.path)
        mean, std = NORMALISATION[model]
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.labels = PARSING_LABELS[model]
        if self.device.type == "cpu":
            # Random (tiny) weights drive activations into denormals, which are very slow on CPUs.
            torch.set_flush_denormal(True)

    def parse(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T,H,W,3] RGB -> uint8 [T,H,W] label ids in this model's order.

        With `frame_step` k > 1 only every k-th frame is parsed and each frame takes the labels of
        the nearest parsed frame (a CPU budget knob; 1 on real data).
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [T,H,W,3], got {frames.dtype} {frames.shape}")
        num, height, width, _ = frames.shape
        if num == 0:
            return np.zeros((0, height, width), np.uint8)
        parsed = np.arange(0, num, self.frame_step)
        labels = np.empty((len(parsed), height, width), np.uint8)
        with torch.inference_mode():
            for start in range(0, len(parsed), self.frame_batch):
                chunk = frames[parsed[start : start + self.frame_batch]]
                labels[start : start + len(chunk)] = self._parse_batch(chunk)
        nearest = np.minimum(np.rint(np.arange(num) / self.frame_step).astype(int), len(parsed) - 1)
        return labels[nearest]

    def _parse_batch(self, chunk: np.ndarray) -> np.ndarray:
        height, width = chunk.shape[1:3]
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if (height, width) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits = self.net(x)[0]  # (B, 19, s, s): both networks return the parsing logits first
        logits = logits.float()
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


def box_masks(
    boxes: Sequence[Any] | None, num: int, size: tuple[int, int], scale: float, centre: float
) -> np.ndarray:
    """Filled rectangles, one per frame: the face box scaled by `scale` about its centre, clipped to
    the frame; a frame whose box is null or not finite gets an empty mask. Without boxes (the clip is
    already a face crop) every frame gets the central square of side `centre` x the frame."""
    height, width = size
    masks = np.zeros((num, height, width), bool)
    if boxes is None:
        side_y, side_x = centre * height, centre * width
        y0, x0 = round((height - side_y) / 2), round((width - side_x) / 2)
        masks[:, y0 : y0 + round(side_y), x0 : x0 + round(side_x)] = True
        return masks
    if len(boxes) != num:
        raise ValueError(f"face_boxes has {len(boxes)} boxes for {num} frames")
    for i, box in enumerate(boxes):
        if box is None or len(box) != 4 or not np.all(np.isfinite(np.asarray(box, np.float64))):
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, scale * (x1 - x0) / 2, scale * (y1 - y0) / 2
        left, right = max(0, round(cx - half_w)), min(width, round(cx + half_w))
        top, bottom = max(0, round(cy - half_h)), min(height, round(cy + half_h))
        masks[i, top:bottom, left:right] = True
    return masks


def _face_boxes(row: Row) -> list[Any] | None:
    value = row.get("face_boxes")
    return json.loads(str(value)) if value not in (None, "") else None


@register_stage
class FaceMaskStage(Stage):
    """Per-frame face mask (bool [T,R,R]) for every clip.

    Options:
      model        "parsenet" (default, 512² CelebAMask-HQ) | "bisenet" (ResNet18, faster)
      labels       parsing labels that count as face: names (model-independent) or ids in the
                   model's own order; default FACE_LABELS (hair, ears, neck off)
      mode         "parsing" (default) | "box": the authors' rectangle rule, no model
      input_size   side the frames are resized to for parsing (default 512; multiple of 32)
      frame_batch  frames per forward pass (default 16)
      frame_step   parse every k-th frame, the others copy the nearest (default 1)
      box_scale    box mode: rectangle = face box scaled about its centre (default 1.0)
      centre_box   box mode without face boxes: side of the central square, fraction (default 0.8)
      device       "auto" (default) | "cpu" | "cuda" | "cuda:N"
    """

    name: ClassVar[str] = "face_mask"
    buckets: ClassVar[tuple[str, ...] | None] = None
    outputs: ClassVar[dict[str, Any]] = {"face_mask": np.zeros((0, 1, 1), bool)}
    MODES: ClassVar[tuple[str, ...]] = ("parsing", "box")

    def __init__(
        self,
        weights_dir: str,
        model: str = "parsenet",
        labels: Sequence[str | int] | None = None,
        mode: str = "parsing",
        input_size: int = 512,
        frame_batch: int = 16,
        frame_step: int = 1,
        box_scale: float = 1.0,
        centre_box: float = 0.8,
        device: str = "auto",
        gpu_share: float = 0.0,
        **unknown: Any,
    ):
        if unknown:
            raise ValueError(f"face_mask: unknown option(s) {sorted(unknown)}")
        limit_torch_memory(resolve_device(device), gpu_share)  # a fractional num_gpus shares one device
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if model not in PARSING_MODELS:
            raise ValueError(f"model must be one of {PARSING_MODELS}, got {model!r}")
        if not box_scale > 0:
            raise ValueError(f"box_scale must be > 0, got {box_scale!r}")
        if not 0 < centre_box <= 1:
            raise ValueError(f"centre_box must be in (0, 1], got {centre_box!r}")
        self.mode, self.box_scale, self.centre_box = mode, float(box_scale), float(centre_box)
        self.label_ids = label_ids(model, FACE_LABELS if labels is None else labels)
        self.parser = (
            FaceParser(weights_dir, model, device, input_size, frame_batch, frame_step)
            if mode == "parsing"
            else None
        )

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        return [] if options.get("mode", "parsing") == "box" else [options.get("model", "parsenet")]

    def process(self, row: Row) -> Row:
        frames = np.asarray(row["frames"])
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [T,H,W,3], got {frames.shape}")
        if self.parser is None:
            mask = box_masks(
                _face_boxes(row), len(frames), frames.shape[1:3], self.box_scale, self.centre_box
            )
        else:
            mask = np.isin(self.parser.parse(frames), self.label_ids)
            update_json_field(row, "weights", {self.parser.model: self.parser.weights_id})
        empty = int((~mask.reshape(len(mask), -1).any(axis=1)).sum())
        update_json_field(row, "extra", {"face_mask_mode": self.mode, "face_mask_empty_frames": empty})
        row["face_mask"] = mask
        return row


def _write_state_dict(net: torch.nn.Module, dest: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point() and tensor.ndim > 1:
                # Fan-in scaled normal weights keep activations in range through the deep nets.
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
    torch.save(net.state_dict(), dest)


@register_tiny_writer("parsenet")
def write_tiny_parsenet(dest: Path, seed: int) -> None:
    """facexlib's ParseNet exactly as init_parsing_model builds it, random weights, real key layout."""
    from facexlib.parsing import ParseNet

    _write_state_dict(ParseNet(in_size=512, out_size=512, parsing_ch=19), dest, seed)


@register_tiny_writer("bisenet")
def write_tiny_bisenet(dest: Path, seed: int) -> None:
    """facexlib's BiSeNet(num_class=19) as init_parsing_model builds it, random weights."""
    from facexlib.parsing import BiSeNet

    _write_state_dict(BiSeNet(num_class=19), dest, seed)
