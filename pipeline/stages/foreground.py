"""Foreground (person) masks: DensePose where detectron2 and its DensePose project are installed, else
the union of the non-background face-parsing labels. The backend that ran is recorded per clip.

The DensePose backend follows the authors' rule (REFERENCE.md §2): a pixel is foreground where any
body part is predicted for any detected person. detectron2 / densepose are imported only when that
backend is chosen; neither is on PyPI (install steps in docs/stage_face_mask.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.rows import Row, update_json_field
from pipeline.stages.base import Stage, register_stage
from pipeline.stages.device import limit_torch_memory, resolve_device
from pipeline.stages.face_mask import PARSING_MODELS, FaceParser, check_int
from pipeline.weights import MissingWeights, file_id, load_weight_specs

log = logging.getLogger(__name__)

BACKENDS = ("auto", "densepose", "parsing")
DENSEPOSE_WEIGHTS = "densepose_r50_fpn_s1x"
# detectron2 configs are not part of the installed densepose package: they live beside the weights.
DENSEPOSE_CONFIG = "densepose/densepose_rcnn_R_50_FPN_s1x.yaml"
DENSEPOSE_INSTALL = (
    "install detectron2 and its DensePose project from source on the GPU node:\n"
    "  pip install 'git+https://github.com/facebookresearch/detectron2@<commit>'\n"
    "  pip install 'git+https://github.com/facebookresearch/detectron2@<commit>#subdirectory=projects/DensePose'\n"
    "and copy projects/DensePose/configs/{Base-DensePose-RCNN-FPN.yaml,densepose_rcnn_R_50_FPN_s1x.yaml} "
    "into $WEIGHTS_DIR/densepose/ (see docs/stage_face_mask.md); or set backend=parsing"
)


class DensePoseUnavailable(ImportError):
    """backend="densepose" was asked for and detectron2 / densepose cannot be imported."""


def densepose_import_error() -> str | None:
    """Why detectron2 + densepose cannot be imported here, or None when both import."""
    try:
        import densepose  # noqa: F401
        import detectron2  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken build (ABI, CUDA) counts as absent, with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_backend(backend: str) -> str:
    """ "auto" -> "densepose" when detectron2 + densepose import, else "parsing"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "densepose" if densepose_import_error() is None else "parsing"
    return backend


class DensePoseSegmenter:
    """detectron2's DensePose R-CNN (densepose_rcnn_R_50_FPN_s1x) -> per-frame person masks."""

    def __init__(self, weights_path: Path, config_path: Path, device: torch.device, score_threshold: float):
        reason = densepose_import_error()
        if reason is not None:
            raise DensePoseUnavailable(
                f"backend=densepose needs detectron2 + densepose ({reason}); {DENSEPOSE_INSTALL}"
            )
        from densepose import add_densepose_config
        from densepose.converters import ToMaskConverter
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model

        for path, what in ((weights_path, "weights"), (config_path, "config")):
            if not path.is_file():
                raise MissingWeights(f"{DENSEPOSE_WEIGHTS}: missing {what} {path}; {DENSEPOSE_INSTALL}")
        cfg = get_cfg()
        add_densepose_config(cfg)
        cfg.merge_from_file(str(config_path))
        cfg.MODEL.WEIGHTS = str(weights_path)
        cfg.MODEL.DEVICE = str(device)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        cfg.freeze()
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        # The same test-time resize DefaultPredictor applies; outputs come back in input pixels.
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.to_mask = ToMaskConverter

    def segment(self, frames: np.ndarray, frame_batch: int) -> np.ndarray:
        """uint8 [T,H,W,3] RGB -> bool [T,H,W]: any body part of any detected person."""
        num, height, width, _ = frames.shape
        masks = np.zeros((num, height, width), bool)
        with torch.inference_mode():
            for start in range(0, num, frame_batch):
                inputs = []
                for frame in frames[start : start + frame_batch]:
                    image = np.ascontiguousarray(frame[:, :, ::-1] if self.bgr else frame)
                    image = self.resize.get_transform(image).apply_image(image)
                    tensor = torch.as_tensor(image.astype(np.float32).transpose(2, 0, 1))
                    inputs.append({"image": tensor, "height": height, "width": width})
                for i, output in enumerate(self.model(inputs)):
                    instances = output["instances"]
                    if len(instances) and instances.has("pred_densepose"):
                        # BitMasks [N, H, W]: pixels of each person's box with a predicted body part.
                        per_person = self.to_mask.convert(
                            instances.pred_densepose, instances.pred_boxes, (height, width)
                        )
                        masks[start + i] = per_person.tensor.any(dim=0).cpu().numpy()
        return masks


@register_stage
class ForegroundStage(Stage):
    """Per-frame foreground (person) mask (bool [T,R,R]) for every clip, plus the backend that ran.

    Options:
      backend          "auto" (default: densepose when detectron2 + densepose import, else parsing)
                       | "densepose" | "parsing"
      parsing_model    parsing backend: "parsenet" (default) | "bisenet"
      input_size       parsing backend: side frames are resized to (default 512)
      frame_batch      frames per forward pass (default 16)
      frame_step       parsing backend: parse every k-th frame (default 1)
      score_threshold  densepose backend: person detection score threshold (default 0.8)
      densepose_config densepose backend: detectron2 config (default <weights_dir>/densepose/...s1x.yaml)
      device           "auto" (default) | "cpu" | "cuda" | "cuda:N"
    """

    name: ClassVar[str] = "foreground"
    buckets: ClassVar[tuple[str, ...] | None] = None
    outputs: ClassVar[dict[str, Any]] = {"fg_mask": np.zeros((0, 1, 1), bool), "fg_backend": ""}

    def __init__(
        self,
        weights_dir: str,
        backend: str = "auto",
        parsing_model: str = "parsenet",
        input_size: int = 512,
        frame_batch: int = 16,
        frame_step: int = 1,
        score_threshold: float = 0.8,
        densepose_config: str | None = None,
        device: str = "auto",
        gpu_share: float = 0.0,
        **unknown: Any,
    ):
        if unknown:
            raise ValueError(f"foreground: unknown option(s) {sorted(unknown)}")
        limit_torch_memory(resolve_device(device), gpu_share)  # a fractional num_gpus shares one device
        if parsing_model not in PARSING_MODELS:
            raise ValueError(f"parsing_model must be one of {PARSING_MODELS}, got {parsing_model!r}")
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
        self.backend = resolve_backend(backend)
        self.frame_batch = check_int("frame_batch", frame_batch, 1)
        self.parser: FaceParser | None = None
        self.densepose: DensePoseSegmenter | None = None
        if self.backend == "densepose":
            weights_path = Path(weights_dir) / load_weight_specs()[DENSEPOSE_WEIGHTS].path
            config_path = Path(densepose_config) if densepose_config else Path(weights_dir) / DENSEPOSE_CONFIG
            self.densepose = DensePoseSegmenter(
                weights_path, config_path, resolve_device(device), score_threshold
            )
            self.weights = {DENSEPOSE_WEIGHTS: file_id(weights_path)}
        else:
            self.parser = FaceParser(weights_dir, parsing_model, device, input_size, frame_batch, frame_step)
            self.weights = {parsing_model: self.parser.weights_id}
        log.info("foreground backend: %s", self.backend)

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        if resolve_backend(options.get("backend", "auto")) == "densepose":
            return [DENSEPOSE_WEIGHTS]
        return [options.get("parsing_model", "parsenet")]

    def process(self, row: Row) -> Row:
        frames = np.asarray(row["frames"])
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [T,H,W,3], got {frames.shape}")
        if self.densepose is not None:
            mask = self.densepose.segment(frames, self.frame_batch)
        else:
            mask = self.parser.parse(frames) != 0  # every parsing label but background
        empty = int((~mask.reshape(len(mask), -1).any(axis=1)).sum())
        update_json_field(row, "weights", self.weights)
        update_json_field(row, "extra", {"fg_empty_frames": empty})
        row["fg_mask"] = mask
        row["fg_backend"] = self.backend
        return row
