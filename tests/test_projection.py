"""benchmarks/projection.py's arithmetic on given throughputs (no timing: the figures are inputs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_projection():
    spec = importlib.util.spec_from_file_location("projection", ROOT / "benchmarks" / "projection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_balanced_split_time_gpu_hours_and_bottleneck() -> None:
    projection = load_projection()
    fps = {"face_mask": 100.0, "foreground": 20.0, "gaze": 200.0, "swap": 8.0, "stylise": 1.0}
    cpu_s = {"decode_crop": 0.001, "encode": 0.004}
    result = projection.project(fps, cpu_s, frames=1e6, gpus=[8, 32])
    # device-seconds per dataset frame: share / fps
    w = {"face_mask": 0.01, "foreground": 0.05, "gaze": 0.005, "swap": 0.05, "stylise": 0.1}
    assert result["device_seconds_per_dataset_frame"] == pytest.approx(w)
    assert result["bottleneck"] == "stylise"
    total = sum(w.values())
    eight, thirty_two = result["projection"]
    assert eight["gpu_hours"] == thirty_two["gpu_hours"] == pytest.approx(1e6 * total / 3600, abs=0.1)
    assert eight["balanced_hours"] == pytest.approx(1e6 * total / 8 / 3600, abs=0.01)
    assert thirty_two["balanced_hours"] == pytest.approx(eight["balanced_hours"] / 4, abs=0.01)
    assert sum(eight["balanced_num_gpus"].values()) == pytest.approx(8, abs=0.01)
    assert eight["balanced_num_gpus"]["stylise"] == pytest.approx(8 * 0.1 / total, abs=0.001)
    # The configured split (stylise 4 of 8 GPUs, ...): the slowest stage sets the time.
    split = projection.current_split(projection.CLUSTER_YAML)
    slowest = max(w, key=lambda k: w[k] / split[k])
    assert eight["cluster_yaml_bottleneck"] == slowest
    assert eight["cluster_yaml_split_scaled_hours"] == pytest.approx(
        1e6 * w[slowest] / split[slowest] / 3600, abs=0.01
    )
    assert eight["cluster_yaml_split_scaled_hours"] >= eight["balanced_hours"]  # balancing never loses
    # Decode + encode cores that keep pace with the balanced GPUs.
    assert eight["cpu_cores_to_keep_pace"] == pytest.approx(0.005 / (total / 8), abs=0.1)


def test_stage_results_without_a_throughput_are_refused() -> None:
    projection = load_projection()
    assert projection.stage_fps([{"stage": "gaze", "clip_frames_per_s_at_every_10": 50.0}]) == {"gaze": 50.0}
    with pytest.raises(ValueError, match="no throughput"):
        projection.stage_fps([{"stage": "gaze", "seconds": 3}])
