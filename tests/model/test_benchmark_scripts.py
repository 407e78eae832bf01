"""The GPU benchmark script runs end to end on CPU with the tiny model, so it is ready for a GPU machine."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_step_gpu_script_runs_on_cpu_with_the_tiny_model(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two intra-op threads on a busy 2-core machine stall each other
    try:
        report = load_script("train_step_gpu").main(
            ["--device", "cpu", "--steps", "1", "--out-dir", str(tmp_path / "out"), "--results", str(results)]
        )
    finally:
        torch.set_num_threads(threads)
    assert report == json.loads((tmp_path / "out" / "train_step.json").read_text())
    assert [run["stage"] for run in report["runs"]] == ["stage1", "stage2"]
    stage1, stage2 = report["runs"]
    assert (stage1["stride"], stage2["stride"]) == (2, 12)  # each stage's own config
    assert stage2["trainable_parameters"] < stage1["trainable_parameters"]
    # Each stage's own memory choice: stage 1 checkpoints (motion modules too), stage 2 does not.
    assert stage1["gradient_checkpointing"] and stage1["checkpoint_motion_modules"]
    assert not stage2["gradient_checkpointing"]
    for run in report["runs"]:
        assert run["step_seconds_median"] > 0 and run["step_tflop"] > 0
        assert 0 <= run["data_wait_fraction"] < 1
    section = results.read_text()
    assert section.startswith("# Benchmark results\n") and report["device"] in section
    assert section.count("| stage |") == 1 and "| stage2 |" in section
