"""Face swap (swap bucket only): insightface SCRFD finds the face in each frame, INSwapper replaces it
with the face of another identity drawn from the identity bank (pipeline/identity_bank.py).

Which face is swapped: SCRFD runs on the whole (already face-centred) frame. Where the dataset gives
a face box for the frame (VFHQ), the detection that overlaps that box most is used, and none when the
best overlap is below `min_iou`; without dataset boxes (CelebV-HQ crops) insightface's own rule picks
the largest, most central face. The detector's five landmarks align the face for INSwapper. A frame
without a usable detection keeps its original pixels and is counted in the row's `extra` json.

The models load with insightface's own loaders from the real on-disk layout: `FaceAnalysis(name=<the
buffalo_l folder>)` routes det_10g.onnx / w600k_r50.onnx, `model_zoo.get_model(inswapper_128.onnx)`
routes the swapper. The tiny writers below produce ONNX graphs that those loaders route to the same
classes (SCRFD, ArcFaceONNX, INSwapper) with random weights.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from pipeline.rows import Row, update_json_field
from pipeline.stages.base import Stage, register_stage
from pipeline.stages.device import gpu_memory_fraction
from pipeline.weights import MissingWeights, check_weights, file_id, load_weight_specs, register_tiny_writer

log = logging.getLogger(__name__)

SCRFD, ARCFACE, INSWAPPER = "scrfd_10g", "arcface_r50", "inswapper_128"
DEVICES = ("auto", "cpu", "cuda")

# What the tiny graphs are saved as: insightface's real files are ONNX IR 6-8, opset 11-13.
TINY_IR_VERSION = 8
TINY_OPSET = 13
TINY_MARK = "megactor_profile"  # metadata key the tiny writers set to "tiny"

# SCRFD (det_10g): three strides, two anchors per location, heads in the order scores, boxes, kps.
SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
SCRFD_HEADS = (("score", 1), ("bbox", 4), ("kps", 10))
SCRFD_SCORE_BIAS = {8: -4.0, 16: 0.0, 32: 2.0}  # tiny profile: score logit offset per stride
# ArcFace's five-point template in a 112 crop (insightface.utils.face_align.arcface_dst).
ARCFACE_TEMPLATE = np.array(
    [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]], np.float32
)


# ---------------------------------------------------------------------------------------------
# Tiny writers: real signatures, random weights.


def _save_tiny_onnx(graph: onnx.GraphProto, dest: Path) -> None:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)], producer_name="megactor-tiny"
    )
    model.ir_version = TINY_IR_VERSION
    helper.set_model_props(model, {TINY_MARK: "tiny"})
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _scrfd_head_init(rng: np.random.Generator, head: str, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one patchify conv head. Random, with priors that keep the outputs plausible:
    scores rise with patch brightness (a black frame has no face) and favour the coarse strides (few
    candidates keep NMS cheap), boxes are about 4 strides wide, and landmarks sit in the ArcFace
    layout inside the box, so alignment and paste-back behave."""
    width = dict(SCRFD_HEADS)[head]
    shape = (SCRFD_ANCHORS * width, 3, stride, stride)
    fan_in = 3 * stride * stride
    if head == "score":
        weight = rng.normal(1.0, 0.5, shape) * 6.0 / fan_in  # logit ~ 6 * mean brightness in [-1, 1]
        bias = np.full(SCRFD_ANCHORS, SCRFD_SCORE_BIAS[stride])
    elif head == "bbox":  # distances to the box sides, in strides (insightface multiplies by stride)
        weight = rng.normal(0.0, 0.3, shape) / fan_in
        bias = np.full(SCRFD_ANCHORS * 4, 2.0)
    else:  # landmark offsets from the anchor centre, in strides, x/y interleaved
        weight = rng.normal(0.0, 0.3, shape) / fan_in
        layout = (ARCFACE_TEMPLATE - 56.0) / 112.0 * 4.0
        bias = np.tile(layout.reshape(-1), SCRFD_ANCHORS)
    return weight.astype(np.float32), bias.astype(np.float32)


@register_tiny_writer(SCRFD)
def write_tiny_scrfd(dest: Path, seed: int) -> None:
    """det_10g.onnx look-alike: input [1,3,?,?] BGR-normalised; 9 outputs [n_s, 1|4|10] for strides
    8/16/32 (scores, then boxes, then landmarks), n_s = (H/s)*(W/s)*2, as insightface's SCRFD reads."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    outputs: dict[str, list[onnx.ValueInfoProto]] = {head: [] for head, _ in SCRFD_HEADS}
    for stride in SCRFD_STRIDES:
        for head, width in SCRFD_HEADS:
            weight, bias = _scrfd_head_init(rng, head, stride)
            tag = f"{head}_{stride}"
            inits += [_init(f"{tag}.weight", weight), _init(f"{tag}.bias", bias)]
            inits.append(_init(f"{tag}.shape", np.array([-1, width], np.int64)))
            # (1, A*W, h, w) -> (1, h, w, A*W) -> (h*w*A, W): rows ordered like SCRFD's anchor centres
            nodes.append(
                helper.make_node(
                    "Conv",
                    ["input.1", f"{tag}.weight", f"{tag}.bias"],
                    [f"{tag}.conv"],
                    kernel_shape=[stride, stride],
                    strides=[stride, stride],
                )
            )
            nodes.append(helper.make_node("Transpose", [f"{tag}.conv"], [f"{tag}.nhwc"], perm=[0, 2, 3, 1]))
            last = {"score": "Sigmoid", "bbox": "Relu", "kps": "Identity"}[head]
            nodes.append(helper.make_node("Reshape", [f"{tag}.nhwc", f"{tag}.shape"], [f"{tag}.flat"]))
            nodes.append(helper.make_node(last, [f"{tag}.flat"], [tag]))
            outputs[head].append(helper.make_tensor_value_info(tag, TensorProto.FLOAT, [f"n{stride}", width]))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    ordered = [value for head, _ in SCRFD_HEADS for value in outputs[head]]
    _save_tiny_onnx(helper.make_graph(nodes, "scrfd_tiny", [image], ordered, inits), dest)


@register_tiny_writer(ARCFACE)
def write_tiny_arcface(dest: Path, seed: int) -> None:
    """w600k_r50.onnx look-alike: [N,3,112,112] ((x-127.5)/127.5) -> [N,512]."""
    rng = np.random.default_rng(seed + 1)
    inits = [
        _init("conv.weight", (rng.normal(0, 1, (32, 3, 8, 8)) / np.sqrt(3 * 64)).astype(np.float32)),
        _init("conv.bias", np.zeros(32, np.float32)),
        _init("fc.weight", (rng.normal(0, 1, (32 * 7 * 7, 512)) / np.sqrt(32 * 49)).astype(np.float32)),
        _init("fc.bias", np.zeros(512, np.float32)),
    ]
    # Node names matter: insightface treats a graph starting with Sub and Mul nodes as an mxnet
    # export with built-in normalisation; these names keep the PyTorch-export preprocessing.
    nodes = [
        helper.make_node(
            "Conv",
            ["input.1", "conv.weight", "conv.bias"],
            ["c"],
            "Conv_0",
            kernel_shape=[8, 8],
            strides=[8, 8],
        ),
        helper.make_node("Relu", ["c"], ["r"], "Relu_1"),
        helper.make_node("AveragePool", ["r"], ["p"], "AveragePool_2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], "Flatten_3"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["683"], "Gemm_4"),
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    embedding = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])
    _save_tiny_onnx(helper.make_graph(nodes, "arcface_tiny", [image], [embedding], inits), dest)


@register_tiny_writer(INSWAPPER)
def write_tiny_inswapper(dest: Path, seed: int) -> None:
    """inswapper_128.onnx look-alike: target [1,3,128,128] (RGB/255) and source latent [1,512] ->
    [1,3,128,128] in 0-1 (the target plus a source-dependent residual); `emap` [512,512] is the
    graph's last initializer, which INSwapper reads to map the ArcFace embedding to the latent."""
    rng = np.random.default_rng(seed + 2)
    hidden = 16
    inits = [
        _init("enc.weight", (rng.normal(0, 1, (hidden, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)),
        _init("enc.bias", np.zeros(hidden, np.float32)),
        _init("style.weight", (rng.normal(0, 1, (512, hidden)) * 2.0).astype(np.float32)),
        _init("style.shape", np.array([1, hidden, 1, 1], np.int64)),
        _init("dec.weight", (rng.normal(0, 1, (3, hidden, 3, 3)) / np.sqrt(9 * hidden)).astype(np.float32)),
        _init("dec.bias", np.zeros(3, np.float32)),
        _init("residual.scale", np.array(0.5, np.float32)),
        _init("clip.min", np.array(0.0, np.float32)),
        _init("clip.max", np.array(1.0, np.float32)),
        _init(
            "emap", (rng.normal(0, 1, (512, 512)) / np.sqrt(512)).astype(np.float32)
        ),  # last: read by INSwapper
    ]
    nodes = [
        helper.make_node("Conv", ["target", "enc.weight", "enc.bias"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["source", "style.weight"], ["s"]),
        helper.make_node("Reshape", ["s", "style.shape"], ["s4"]),
        helper.make_node("Add", ["h", "s4"], ["hs"]),
        helper.make_node("Relu", ["hs"], ["a"]),
        helper.make_node("Conv", ["a", "dec.weight", "dec.bias"], ["d"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["d"], ["t"]),
        helper.make_node("Mul", ["t", "residual.scale"], ["r"]),
        helper.make_node("Add", ["target", "r"], ["y"]),
        helper.make_node("Clip", ["y", "clip.min", "clip.max"], ["output"]),
    ]
    target = helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128])
    source = helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])
    _save_tiny_onnx(helper.make_graph(nodes, "inswapper_tiny", [target, source], [output], inits), dest)


# ---------------------------------------------------------------------------------------------
# Loading (shared with the identity bank).


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


def load_inswapper(path: Path, providers: list[Provider]) -> Any:
    from insightface.model_zoo import get_model
    from insightface.model_zoo.inswapper import INSwapper

    model = get_model(str(path), providers=providers)
    if not isinstance(model, INSwapper):
        raise ValueError(f"{path} is not an inswapper graph: insightface routes it to {type(model).__name__}")
    return model


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


# ---------------------------------------------------------------------------------------------
# The stage.


@register_stage
class FaceSwapStage(Stage):
    """Swap every frame's face for the face of a bank identity that is not the clip's own."""

    name = "swap"
    buckets = ("swap",)
    outputs = {"driving_frames": np.zeros((0, 1, 1, 3), np.uint8), "swap_source_identity": ""}

    def __init__(
        self,
        weights_dir: str,
        bank_path: str,
        seed: int = 0,
        det_size: int = 256,
        det_thresh: float = 0.5,
        min_iou: float = 0.3,
        frame_batch: int = 4,
        device: str = "auto",
        gpu_share: float = 0.0,
    ) -> None:
        from pipeline.identity_bank import load_identity_bank

        if det_size < 32 or det_size % 32:
            raise ValueError(
                f"det_size must be a positive multiple of 32 (SCRFD's largest stride), got {det_size}"
            )
        if not 0.0 < det_thresh < 1.0:
            raise ValueError(f"det_thresh must be in (0, 1), got {det_thresh}")
        if not 0.0 <= min_iou <= 1.0:
            raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
        if frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        self.seed = int(seed)
        self.min_iou = float(min_iou)
        self.frame_batch = int(frame_batch)
        self.providers = onnx_providers(device, gpu_share)
        paths = weight_paths(weights_dir, [SCRFD, INSWAPPER])
        self.app = load_face_analysis(weights_dir, ["detection"], self.providers, det_size, det_thresh)
        self.detector = self.app.det_model
        self.swapper = load_inswapper(paths[INSWAPPER], self.providers)
        sessions = {SCRFD: self.detector.session, INSWAPPER: self.swapper.session}
        check_session_providers(sessions, self.providers, device)
        bank = load_identity_bank(Path(bank_path))
        self.bank = {
            str(r.identity): np.asarray(r.normed, np.float32) for r in bank.itertuples() if r.frames_used
        }
        if not self.bank:
            log.warning("identity bank %s has no usable identity: every swap clip will fail", bank_path)
        arcface_ids = sorted(set(bank["arcface_weights"]))
        self.weights = {SCRFD: weights_id(paths[SCRFD]), INSWAPPER: weights_id(paths[INSWAPPER])}
        self.weights[ARCFACE] = ",".join(arcface_ids) if arcface_ids else "none"
        # INSwapper and SCRFD take one image per run (the real graphs have batch 1); frame_batch
        # frames run on threads instead, overlapping ONNX Runtime (GIL released) with the OpenCV work.
        self.pool = ThreadPoolExecutor(self.frame_batch) if self.frame_batch > 1 else None
        self.swap_calls = 0  # INSwapper runs, for tests and benchmarks

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        return [SCRFD, ARCFACE, INSWAPPER]

    def _swap_frame(self, frame: np.ndarray, box: np.ndarray | None, source: Any) -> np.ndarray | None:
        bgr = np.ascontiguousarray(frame[..., ::-1])  # insightface works in OpenCV's BGR
        face = find_face(self.detector, bgr, box, self.min_iou)
        if face is None:
            return None
        swapped = self.swapper.get(bgr, face, source, paste_back=True)
        return np.ascontiguousarray(swapped[..., ::-1])

    def process(self, row: Row) -> Row:
        from insightface.app.common import Face

        from pipeline.identity_bank import choose_source_identity

        frames = np.asarray(row["frames"])
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected frames uint8 [T,R,R,3], got {frames.dtype} {frames.shape}")
        boxes = parse_boxes(row, len(frames))
        identity = choose_source_identity(
            str(row["dataset"]), str(row["clip_id"]), str(row["identity"]), list(self.bank), self.seed
        )
        source = Face(embedding=self.bank[identity])
        out = frames.copy()
        without_face = 0
        for start in range(0, len(frames), self.frame_batch):
            index = range(start, min(start + self.frame_batch, len(frames)))
            jobs = [(frames[t], None if boxes is None else boxes[t], source) for t in index]
            results = (
                self.pool.map(lambda job: self._swap_frame(*job), jobs)
                if self.pool
                else [self._swap_frame(*job) for job in jobs]
            )
            for t, result in zip(index, results, strict=True):
                if result is None:
                    without_face += 1
                else:
                    out[t] = result
                    self.swap_calls += 1
        row["driving_frames"] = out
        row["swap_source_identity"] = identity
        update_json_field(row, "extra", {"swap_frames_without_face": without_face})
        update_json_field(row, "weights", self.weights)
        return row
