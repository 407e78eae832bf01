"""Face swap (swap bucket only): insightface SCRFD finds the face in each frame, INSwapper replaces it
with the face of another identity drawn from the identity bank (pipeline/identity_bank.py).

Which face is swapped: SCRFD runs on the whole (already face-centred) frame. Where the dataset gives
a face box for the frame (VFHQ), the detection that overlaps that box most is used, and none when the
best overlap is below `min_iou`; without dataset boxes (CelebV-HQ crops) insightface's own rule picks
the largest, most central face. The detector's five landmarks align the face for INSwapper.

No frame keeps the target's own face: frames without a usable detection take landmarks interpolated
from their neighbours, the track is smoothed over time, and a clip whose face is missing too often
is a failure row (`fill_face_track`). The swapped face is blended on the row's face parsing mask
(`face_mask`, from the face_mask stage that runs before this one), feathered; insightface's square
mask is the fallback (`face_mask_alpha`, `insightface_alpha`).

The models load with insightface's own loaders from the real on-disk layout: `FaceAnalysis(name=<the
buffalo_l folder>)` routes det_10g.onnx / w600k_r50.onnx, `model_zoo.get_model(inswapper_128.onnx)`
routes the swapper. The tiny writers below produce ONNX graphs that those loaders route to the same
classes (SCRFD, ArcFaceONNX, INSwapper) with random weights.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.faces import (
    ARCFACE,
    INSWAPPER,
    SCRFD,
    TINY_MARK,
    Provider,
    check_session_providers,
    find_face,
    load_face_analysis,
    onnx_providers,
    parse_boxes,
    weight_paths,
    weights_id,
)
from pipeline.identity_bank import choose_source_identity, load_identity_bank, source_cosine
from pipeline.rows import Row, update_json_field
from pipeline.stages.base import Stage, register_stage
from pipeline.weights import register_tiny_writer

log = logging.getLogger(__name__)

# Largest ArcFace cosine allowed between a clip's identity and its swap source. Two photos of one
# person score well above it with insightface's w600k_r50, two strangers mostly well below.
DEFAULT_MAX_SOURCE_COSINE = 0.3

# What the tiny graphs are saved as: insightface's real files are ONNX IR 6-8, opset 11-13.
TINY_IR_VERSION = 8
TINY_OPSET = 13

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
# Loading (detection / recognition shared with the identity bank: pipeline/faces.py).


def load_inswapper(path: Path, providers: list[Provider]) -> Any:
    from insightface.model_zoo import get_model
    from insightface.model_zoo.inswapper import INSwapper

    model = get_model(str(path), providers=providers)
    if not isinstance(model, INSwapper):
        raise ValueError(f"{path} is not an inswapper graph: insightface routes it to {type(model).__name__}")
    return model


# ---------------------------------------------------------------------------------------------
# The face track: detections filled over short gaps and smoothed over time.


class FaceTrackError(ValueError):
    """The clip's face is missing from too many frames to swap every frame: the clip is dropped
    (a failure row) rather than written with frames that still show the target's own face."""


def fill_face_track(
    boxes: list[np.ndarray | None],
    kpss: list[np.ndarray | None],
    max_missing_fraction: float,
    max_gap: int,
    smooth_sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame boxes [T,4] and landmarks [T,5,2] with no frame left out.

    Frames without a detection take the landmarks (and box) interpolated linearly between the
    nearest detected frames on either side, or held from the nearest one at the clip's ends. The
    track is then smoothed with a Gaussian over time (sigma in frames; 0 = off), which removes the
    detector's frame-to-frame jitter that would otherwise make the swapped face shimmer. Raises
    FaceTrackError when more than `max_missing_fraction` of the frames, or a run of more than
    `max_gap` frames, have no detection."""
    found = np.array([k is not None for k in kpss])
    total, missing = len(found), int((~found).sum())
    if not found.any():
        raise FaceTrackError(f"no face detected in any of the {total} frames")
    if missing / total > max_missing_fraction:
        raise FaceTrackError(
            f"no face detected in {missing} of {total} frames "
            f"({missing / total:.2f} > max_missing_fraction={max_missing_fraction})"
        )
    longest = _longest_run(~found)
    if longest > max_gap:
        raise FaceTrackError(f"{longest} consecutive frames without a face (more than max_gap={max_gap})")
    times = np.flatnonzero(found)
    track = np.stack(
        [np.concatenate([b, k.reshape(-1)]) for b, k in zip(boxes, kpss, strict=True) if k is not None]
    )
    every = np.arange(total)
    # np.interp holds the end values outside the detected range: the hold at the clip's ends.
    filled = np.stack([np.interp(every, times, track[:, j]) for j in range(track.shape[1])], axis=1)
    filled = _smooth_over_time(filled, smooth_sigma)
    return filled[:, :4].astype(np.float32), filled[:, 4:].reshape(total, 5, 2).astype(np.float32)


def _longest_run(flags: np.ndarray) -> int:
    longest = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        longest = max(longest, run)
    return longest


def _smooth_over_time(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter along axis 0, edges padded with the end values (no pull towards zero)."""
    if sigma <= 0 or len(values) < 2:
        return values
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.concatenate([np.repeat(values[:1], radius, 0), values, np.repeat(values[-1:], radius, 0)])
    return np.stack([np.convolve(padded[:, j], taps, mode="valid") for j in range(values.shape[1])], axis=1)


# ---------------------------------------------------------------------------------------------
# Paste-back: the swapped 128-px face is warped into the frame and blended with a weight map.


def insightface_alpha(matrix: np.ndarray, shape: tuple[int, int], crop: int = 128) -> np.ndarray:
    """The blend weight INSwapper.get(paste_back=True) uses (insightface model_zoo/inswapper.py, same steps): the
    crop's square warped into the frame, eroded by a tenth of its size and blurred."""
    import cv2

    inverse = cv2.invertAffineTransform(matrix)
    white = np.full((crop, crop), 255, np.float32)
    mask = cv2.warpAffine(white, inverse, (shape[1], shape[0]), borderValue=0.0)
    mask[mask > 20] = 255
    rows, cols = np.where(mask == 255)
    size = int(np.sqrt((rows.max() - rows.min()) * (cols.max() - cols.min())))
    k = max(size // 10, 10)
    mask = cv2.erode(mask, np.ones((k, k), np.uint8), iterations=1)
    k = max(size // 20, 5)
    mask = cv2.GaussianBlur(mask, (2 * k + 1, 2 * k + 1), 0)
    return mask / 255


def face_mask_alpha(
    face_mask: np.ndarray, matrix: np.ndarray, feather: float, crop: int = 128
) -> np.ndarray | None:
    """Blend weight from the face parsing mask: the face region (inside the part of the frame the
    swapped crop covers) blurred by `feather` x the face's size, so the swap ends on the face's own
    contour instead of a box through hair and background. None when the two do not overlap."""
    import cv2

    shape = face_mask.shape
    inverse = cv2.invertAffineTransform(matrix)
    cover = cv2.warpAffine(np.ones((crop, crop), np.float32), inverse, (shape[1], shape[0])) > 0.999
    region = face_mask & cover
    area = float(region.sum())
    if area < 16:
        return None
    sigma = max(feather * np.sqrt(area), 0.8)
    # Outside the crop the warped face is black: fade the weight out over 3 sigma inside the crop's
    # edge. It matters only where the face is larger than the crop (forehead, chin); an erosion by
    # the blur's reach instead would cut the cheeks and chin of a real 512² face with a box.
    inside = cv2.distanceTransform(cover.astype(np.uint8), cv2.DIST_L2, 5)
    fade = np.clip(inside / (3 * sigma), 0.0, 1.0)
    alpha = cv2.GaussianBlur(region.astype(np.float32), (0, 0), sigma) * fade
    return alpha.astype(np.float32)


def paste_face(
    frame_bgr: np.ndarray, fake_bgr: np.ndarray, matrix: np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """alpha x (swapped face warped back) + (1 - alpha) x frame, truncated to uint8 as insightface does."""
    import cv2

    inverse = cv2.invertAffineTransform(matrix)
    shape = frame_bgr.shape
    warped = cv2.warpAffine(fake_bgr, inverse, (shape[1], shape[0]), borderValue=0.0)
    weight = alpha[..., None]
    merged = weight * warped + (1 - weight) * frame_bgr.astype(np.float32)
    return merged.astype(np.uint8)


def seam_energy(composite: np.ndarray, original: np.ndarray, face_mask: np.ndarray, inner: int) -> float:
    """How much edge a paste-back adds where the swapped face meets the rest of the frame: the mean,
    over every pixel except the face's core (the face mask eroded by `inner` px), of the squared
    Sobel gradient of the grey composite above that of the original frame (grey levels^2 per px^2).
    Inside the core the new face legitimately brings its own edges; everywhere else an added edge is
    the seam (insightface's square through hair and background, or the feathered face contour)."""
    import cv2

    totals = []
    kernel = np.ones((2 * inner + 1, 2 * inner + 1), np.uint8)
    for comp, orig, mask in zip(composite, original, face_mask, strict=True):
        energy = []
        for image in (comp, orig):
            grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
            gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
            energy.append(gx**2 + gy**2)
        outside = ~cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
        totals.append(float(np.clip(energy[0] - energy[1], 0, None)[outside].mean()))
    return float(np.mean(totals))


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
        max_missing_fraction: float = 0.2,
        max_gap: int = 12,
        smooth_sigma: float = 1.0,
        blend_feather: float = 0.08,
        max_source_cosine: float | None = None,
        frame_batch: int = 4,
        device: str = "auto",
        gpu_share: float = 0.0,
    ) -> None:
        if det_size < 32 or det_size % 32:
            raise ValueError(
                f"det_size must be a positive multiple of 32 (SCRFD's largest stride), got {det_size}"
            )
        if not 0.0 < det_thresh < 1.0:
            raise ValueError(f"det_thresh must be in (0, 1), got {det_thresh}")
        if not 0.0 <= min_iou <= 1.0:
            raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
        if not 0.0 <= max_missing_fraction < 1.0:
            raise ValueError(f"max_missing_fraction must be in [0, 1), got {max_missing_fraction}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        if smooth_sigma < 0 or blend_feather <= 0:
            raise ValueError(
                f"smooth_sigma must be >= 0 and blend_feather > 0, got {smooth_sigma}, {blend_feather}"
            )
        if max_source_cosine is not None and not -1.0 <= max_source_cosine <= 1.0:
            raise ValueError(f"max_source_cosine must be in [-1, 1], got {max_source_cosine}")
        if frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        self.seed = int(seed)
        self.min_iou = float(min_iou)
        self.max_missing_fraction, self.max_gap = float(max_missing_fraction), int(max_gap)
        self.smooth_sigma, self.blend_feather = float(smooth_sigma), float(blend_feather)
        self.frame_batch = int(frame_batch)
        self.providers = onnx_providers(device, gpu_share)
        paths = weight_paths(weights_dir, [SCRFD, INSWAPPER])
        self.app = load_face_analysis(weights_dir, ["detection"], self.providers, det_size, det_thresh)
        self.detector = self.app.det_model
        self.swapper = load_inswapper(paths[INSWAPPER], self.providers)
        sessions = {SCRFD: self.detector.session, INSWAPPER: self.swapper.session}
        check_session_providers(sessions, self.providers, device)
        bank = load_identity_bank(bank_path)
        self.bank = {
            str(r.identity): np.asarray(r.normed, np.float32) for r in bank.itertuples() if r.frames_used
        }
        if not self.bank:
            log.warning("identity bank %s has no usable identity: every swap clip will fail", bank_path)
        arcface_ids = sorted(set(bank["arcface_weights"]))
        self.weights = {SCRFD: weights_id(paths[SCRFD]), INSWAPPER: weights_id(paths[INSWAPPER])}
        self.weights[ARCFACE] = ",".join(arcface_ids) if arcface_ids else "none"
        # The tiny profile's ArcFace has random weights: its cosines say nothing about who is who
        # (the demo's identities score 0.5-0.8), so only an explicit margin applies there.
        if max_source_cosine is None:
            max_source_cosine = 1.0 if arcface_ids == ["tiny"] else DEFAULT_MAX_SOURCE_COSINE
        self.max_source_cosine = float(max_source_cosine)
        # INSwapper and SCRFD take one image per run (the real graphs have batch 1); frame_batch
        # frames run on threads instead, overlapping ONNX Runtime (GIL released) with the OpenCV work.
        self.pool = ThreadPoolExecutor(self.frame_batch) if self.frame_batch > 1 else None
        self.swap_calls = 0  # INSwapper runs, for tests and benchmarks

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        return [SCRFD, ARCFACE, INSWAPPER]

    def _map(self, fn: Any, jobs: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, jobs)) if self.pool else [fn(job) for job in jobs]

    def _detect(self, job: tuple[np.ndarray, np.ndarray | None]) -> Any:
        frame, box = job
        return find_face(self.detector, np.ascontiguousarray(frame[..., ::-1]), box, self.min_iou)

    def _swap_frame(self, job: tuple[np.ndarray, Any, Any, np.ndarray | None]) -> tuple[np.ndarray, bool]:
        """One frame swapped and pasted back; True when the face mask was the blend weight."""
        frame, face, source, face_mask = job
        bgr = np.ascontiguousarray(frame[..., ::-1])  # insightface works in OpenCV's BGR
        fake, matrix = self.swapper.get(bgr, face, source, paste_back=False)
        alpha = None if face_mask is None else face_mask_alpha(face_mask, matrix, self.blend_feather)
        on_mask = alpha is not None
        if alpha is None:  # no parsing mask for this frame: insightface's own square mask
            alpha = insightface_alpha(matrix, bgr.shape[:2], self.swapper.input_size[0])
        return np.ascontiguousarray(paste_face(bgr, fake, matrix, alpha)[..., ::-1]), on_mask

    def process(self, row: Row) -> Row:
        from insightface.app.common import Face

        frames = np.asarray(row["frames"])
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected frames uint8 [T,R,R,3], got {frames.dtype} {frames.shape}")
        boxes = parse_boxes(row, len(frames))
        masks = face_masks(row, frames.shape[:3])
        own = str(row["identity"])
        identity = choose_source_identity(
            str(row["dataset"]), str(row["clip_id"]), own, list(self.bank), self.seed,
            embeddings=self.bank, max_cosine=self.max_source_cosine,
        )  # fmt: skip
        source = Face(embedding=self.bank[identity])
        detections = self._map(
            self._detect, [(f, None if boxes is None else boxes[t]) for t, f in enumerate(frames)]
        )
        track_boxes, track_kps = fill_face_track(
            [None if d is None else np.asarray(d.bbox, np.float32) for d in detections],
            [None if d is None else np.asarray(d.kps, np.float32) for d in detections],
            self.max_missing_fraction,
            self.max_gap,
            self.smooth_sigma,
        )
        jobs = [
            (
                frames[t],
                Face(bbox=track_boxes[t], kps=track_kps[t]),
                source,
                None if masks is None else masks[t],
            )
            for t in range(len(frames))
        ]
        results = self._map(self._swap_frame, jobs)
        self.swap_calls += len(results)
        row["driving_frames"] = np.stack([frame for frame, _ in results])
        row["swap_source_identity"] = identity
        cosine = source_cosine(self.bank[identity], self.bank[own]) if own in self.bank else None
        extra = {
            "swap_frames_without_face": sum(d is None for d in detections),  # filled from the neighbours
            "swap_frames_on_face_mask": sum(on_mask for _, on_mask in results),
            "swap_source_cosine": None if cosine is None else round(cosine, 4),
        }
        update_json_field(row, "extra", extra)
        update_json_field(row, "weights", self.weights)
        return row


def face_masks(row: Row, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The row's face parsing masks (bool [T,R,R], from the face_mask stage that runs before the swap),
    or None when the build has no face_mask stage (its placeholder has 0 frames)."""
    mask = row.get("face_mask")
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape[0] == 0:
        return None
    if mask.shape != shape:
        raise ValueError(f"face_mask has shape {mask.shape}, frames {shape}")
    return mask.astype(bool)
