"""Face detection and recognition loading shared by the swap stage (pipeline/stages/face_swap.py) and the
identity bank (pipeline/identity_bank.py): ONNX Runtime providers, the checked weight paths, insightface's
FaceAnalysis on the local buffalo_l folder (SCRFD + ArcFace), and finding the clip's face in a frame.

One module both import, so neither imports the other for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from pipeline.rows import Row
from pipeline.stages.device import gpu_memory_fraction
from pipeline.weights import MissingWeights, check_weights, file_id, load_weight_specs

log = logging.getLogger(__name__)

SCRFD, ARCFACE, INSWAPPER = "scrfd_10g", "arcface_r50", "inswapper_128"
DEVICES = ("auto", "cpu", "cuda")
TINY_MARK = "megactor_profile"  # metadata key the tiny writers set to "tiny"

Provider = str | tuple[str, dict[str, Any]]
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def onnx_providers(device: str, gpu_share: float = 0.0) -> list[Provider]:
    """ONNX Runtime providers for `device`: CUDA (with CPU fallback for unsupported ops) or CPU. A
    fractional `gpu_share` caps the CUDA arena at that share of the device's memory."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = CUDA_PROVIDER in onnxruntime.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ValueError(
            "device='cuda' but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )
    if device == "auto" and not has_cuda and torch_sees_a_gpu():
        log.warning(
            "a CUDA GPU is present but onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu missing or "
            "broken: %s): SCRFD and INSwapper run on the CPU", onnxruntime.get_available_providers(),
        )  # fmt: skip
    if device == "cpu" or not has_cuda:
        return [CPU_PROVIDER]
    fraction = gpu_memory_fraction(gpu_share)
    if fraction is None:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    import torch

    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    if not total:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    options = {"gpu_mem_limit": int(fraction * total), "arena_extend_strategy": "kSameAsRequested"}
    return [(CUDA_PROVIDER, options), CPU_PROVIDER]


def torch_sees_a_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def check_session_providers(sessions: dict[str, Any], wanted: list[Provider], device: str) -> None:
    """ONNX Runtime falls back to the CPU silently when the CUDA provider cannot start: compare what each
    session got with what was asked. device='cuda' makes that an error, 'auto' a warning."""
    if provider_name(wanted[0]) != CUDA_PROVIDER:
        return
    on_cpu = [name for name, session in sessions.items() if CUDA_PROVIDER not in session.get_providers()]
    if not on_cpu:
        return
    message = (
        f"asked ONNX Runtime for {CUDA_PROVIDER}, but {', '.join(on_cpu)} run on "
        f"{sessions[on_cpu[0]].get_providers()} (CUDA / cuDNN libraries missing or not matching onnxruntime-gpu?)"
    )
    if device == "cuda":
        raise RuntimeError(message)
    log.warning("%s", message)


def weight_paths(weights_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Paths of the named files; one MissingWeights naming every missing one; a clear error for a
    file that is not a readable ONNX model (checked before insightface, whose errors are cryptic)."""
    problems = check_weights(Path(weights_dir), names, verify_hash=False)
    if problems:
        raise MissingWeights(f"{len(problems)} weights file(s) missing:\n  " + "\n  ".join(problems))
    specs = load_weight_specs()
    paths = {name: Path(weights_dir) / specs[name].path for name in names}
    for name, path in paths.items():
        try:
            weights_id(path)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a damaged file
            raise ValueError(
                f"{name}: {path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                f"replace it (origin: {specs[name].origin}) or delete it to regenerate the tiny profile"
            ) from exc
    return paths


_WEIGHT_IDS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> id: parse a file once


def weights_id(path: Path) -> str:
    """'tiny' for our random-weight graphs, else the file's sha256 prefix (recorded per sample).
    Parses the ONNX file, so an unreadable file raises here."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHT_IDS:
        model = onnx.load_model(str(path), load_external_data=False)
        if {p.key: p.value for p in model.metadata_props}.get(TINY_MARK) == "tiny":
            _WEIGHT_IDS[key] = "tiny"
        else:
            _WEIGHT_IDS[key] = file_id(Path(path))
    return _WEIGHT_IDS[key]


def load_face_analysis(
    weights_dir: str | Path,
    modules: list[str],
    providers: list[Provider],
    det_size: int,
    det_thresh: float,
) -> Any:
    """insightface FaceAnalysis on the local buffalo_l folder (never downloads)."""
    from insightface.app import FaceAnalysis

    names = [SCRFD] + ([ARCFACE] if "recognition" in modules else [])
    paths = weight_paths(weights_dir, names)
    folder = paths[SCRFD].parent.resolve()
    if any(path.parent.resolve() != folder for path in paths.values()):
        raise ValueError(f"{names} must sit in one folder (FaceAnalysis loads a folder); got {paths}")
    app = FaceAnalysis(
        name=str(folder), root=str(folder.parent), allowed_modules=modules, providers=providers
    )
    for module in modules:
        if module not in app.models:
            raise ValueError(f"FaceAnalysis found no {module} model among the .onnx files in {folder}")
    ctx_id = 0 if provider_name(providers[0]) == CUDA_PROVIDER else -1
    app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))
    return app


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each (x0, y0, x1, y1) row of `boxes` with `box`."""
    x0 = np.maximum(boxes[:, 0], box[0])
    y0 = np.maximum(boxes[:, 1], box[1])
    x1 = np.minimum(boxes[:, 2], box[2])
    y1 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + (box[2] - box[0]) * (box[3] - box[1]) - inter, 1e-6)


def find_face(detector: Any, bgr: np.ndarray, box: np.ndarray | None, min_iou: float) -> Any:
    """The clip's face in one BGR frame as an insightface Face (bbox, kps, det_score), or None.

    With a dataset box: the detection overlapping it most (IoU >= min_iou). Without: insightface's
    max_num=1 choice (largest and most central)."""
    from insightface.app.common import Face

    bboxes, kpss = detector.detect(bgr, max_num=0 if box is not None else 1)
    if len(bboxes) == 0 or kpss is None:
        return None
    best = 0
    if box is not None:
        ious = box_iou(bboxes[:, :4], np.asarray(box, np.float32))
        best = int(np.argmax(ious))
        if ious[best] < min_iou:
            return None
    return Face(bbox=bboxes[best, :4], kps=kpss[best], det_score=float(bboxes[best, 4]))


def parse_boxes(row: Row, num_frames: int) -> np.ndarray | None:
    """The row's per-frame face boxes in output pixels, or None when the dataset has none."""
    text = str(row.get("face_boxes") or "")
    if not text:
        return None
    boxes = np.asarray(json.loads(text), np.float32).reshape(-1, 4)
    if len(boxes) != num_frames:
        raise ValueError(f"face_boxes has {len(boxes)} boxes for {num_frames} frames")
    return boxes
