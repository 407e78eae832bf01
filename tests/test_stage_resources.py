"""What a stage actor may take of a shared GPU, and ONNX Runtime's silent CPU fallback made loud."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper

from pipeline.dag import stage_kwargs
from pipeline.faces import check_session_providers, onnx_providers
from pipeline.stages import get_stage
from pipeline.stages.device import gpu_memory_fraction, limit_torch_memory, resolve_device


def test_fractional_num_gpus_is_the_memory_share() -> None:
    assert gpu_memory_fraction(0.25) == 0.25
    assert (
        gpu_memory_fraction(1) is None and gpu_memory_fraction(0) is None and gpu_memory_fraction(2) is None
    )
    assert limit_torch_memory(resolve_device("cpu"), 0.25) is None  # no CUDA device: nothing to cap


@pytest.mark.parametrize("name", ["face_mask", "foreground", "gaze", "swap", "stylise"])
def test_every_stage_actor_is_told_its_gpu_share(name: str) -> None:
    kwargs = stage_kwargs(get_stage(name), {}, {"weights_dir": "w", "gpu_share": 0.3, "unrelated": 1})
    assert kwargs["gpu_share"] == 0.3 and "unrelated" not in kwargs


def test_onnx_arena_is_capped_at_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: an onnxruntime-gpu install and an 80 GiB device are simulated to check the options."""
    import torch

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=80 * 2**30)
    )
    (cuda, options), cpu = onnx_providers("auto", gpu_share=0.25)
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert options["gpu_mem_limit"] == 20 * 2**30
    assert onnx_providers("auto", gpu_share=1) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cpu", gpu_share=0.25) == ["CPUExecutionProvider"]


def tiny_session(providers: list) -> onnxruntime.InferenceSession:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=providers)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CPU onnxruntime only"
)
def test_asked_for_cuda_and_given_cpu_is_an_error_or_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # A real session asked for CUDA on this CPU build of onnxruntime: it silently runs on the CPU.
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = tiny_session(wanted)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.run(None, {"x": np.array([-1.0], np.float32)})[0][0] == 0.0
    with pytest.raises(RuntimeError, match="scrfd run on \\['CPUExecutionProvider'\\]"):
        check_session_providers({"scrfd": session}, wanted, "cuda")
    with caplog.at_level(logging.WARNING):
        check_session_providers({"scrfd": session}, wanted, "auto")
    assert "asked ONNX Runtime for CUDAExecutionProvider" in caplog.text
    check_session_providers({"scrfd": session}, ["CPUExecutionProvider"], "cpu")  # asked for CPU: fine
