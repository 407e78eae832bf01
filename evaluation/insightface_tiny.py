"""Tiny writers for buffalo_l's landmark graphs (2d106det.onnx, 1k3d68.onnx): the real input signature
([1,3,192,192], which insightface's model zoo routes to its Landmark class) and output width (212 =
106x2, 3309 whose last 68x3 values are the 3D landmarks), random weights around a face-like layout so
that alignment and pose stay finite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from evaluation.faces import LANDMARK_2D106, LANDMARK_3D68
from pipeline.stages.face_swap import _init, _save_tiny_onnx
from pipeline.weights import register_tiny_writer

INPUT_SIZE = 192
PATCH = 16


def _landmark_graph(dest: Path, seed: int, width: int, layout: np.ndarray, name: str) -> None:
    rng = np.random.default_rng(seed)
    channels, cells = 8, (INPUT_SIZE // PATCH) ** 2
    bias = np.zeros(width, np.float32)
    bias[width - layout.size :] = layout.reshape(-1)
    inits = [
        _init("conv.weight", (rng.normal(0, 1, (channels, 3, PATCH, PATCH)) / (3 * PATCH * PATCH)).astype(np.float32)),
        _init("conv.bias", np.zeros(channels, np.float32)),
        _init("fc.weight", (rng.normal(0, 0.02, (channels * cells, width)) / np.sqrt(channels * cells)).astype(np.float32)),
        _init("fc.bias", bias),
    ]  # fmt: skip
    # Node names matter: a graph starting with Sub / Mul nodes is read as an mxnet export.
    nodes = [
        helper.make_node("Conv", ["data", "conv.weight", "conv.bias"], ["c"], "Conv_0",
                         kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH]),
        helper.make_node("Relu", ["c"], ["r"], "Relu_1"),
        helper.make_node("Flatten", ["r"], ["f"], "Flatten_2"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["fc1"], "Gemm_3"),
    ]  # fmt: skip
    image = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, width])
    _save_tiny_onnx(helper.make_graph(nodes, name, [image], [out], inits), dest)


@register_tiny_writer(LANDMARK_2D106)
def write_tiny_landmark_2d106(dest: Path, seed: int) -> None:
    rng = np.random.default_rng(seed + 3)
    layout = rng.uniform(-0.4, 0.4, (106, 2)).astype(np.float32)  # in the crop's [-1, 1] frame
    _landmark_graph(dest, seed + 3, 212, layout, "landmark_2d106_tiny")


@register_tiny_writer(LANDMARK_3D68)
def write_tiny_landmark_3d68(dest: Path, seed: int) -> None:
    from insightface.data import get_object

    mean = np.asarray(get_object("meanshape_68.pkl"), np.float32)  # (68, 3), the graph's reference face
    mean = (mean - mean.mean(0)) / np.abs(mean[:, :2]).max() * 0.5
    _landmark_graph(dest, seed + 4, 3309, mean, "landmark_3d68_tiny")
