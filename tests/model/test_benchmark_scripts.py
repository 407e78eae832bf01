"""The GPU benchmark script runs end to end on CPU with the tiny model, so it is ready for a GPU machine."""

import importlib.util
import json
import subprocess
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
            ["--device", "cpu", "--steps", "2", "--ema", "--peak-tflops", "1", "--out-dir", str(tmp_path / "out"),
             "--results", str(results)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert report == json.loads((tmp_path / "out" / "train_step.json").read_text())
    assert [run["stage"] for run in report["runs"]] == ["stage1", "stage2"]
    stage1, stage2 = report["runs"]
    assert (stage1["stride"], stage2["stride"]) == (2, 12)  # each stage's own config
    assert stage2["trainable_parameters"] < stage1["trainable_parameters"]
    # Each stage's own memory choice: stage 1 checkpoints, stage 2 does not.
    assert stage1["gradient_checkpointing"] and not stage2["gradient_checkpointing"]
    for run in report["runs"]:
        # Wrapped as the trainer wraps it, with the EMA asked for.
        assert run["strategy"] == "DistributedDataParallel (1 rank)" and run["ema"]
        assert run["step_seconds_median"] > 0 and len(run["data_wait_seconds_all"]) == 2
        assert 0 <= run["data_wait_fraction"] < 1
        # Model FLOPs leave out the frozen VAE / CLIP (and stage 1's recompute): less than what ran.
        assert 0 < run["model_tflop"] < run["executed_tflop"]
        assert 0 < run["mfu"] < run["hfu"]
    section = results.read_text()
    assert section.startswith("# Benchmark results\n") and report["device"] in section
    assert section.count("| stage |") == 1 and "| stage2 |" in section and "MFU" in section


def test_train_step_gpu_peak_is_looked_up_by_the_exact_device_name(caplog):
    script = load_script("train_step_gpu")
    assert script.peak_tflops("NVIDIA H100 80GB HBM3", 0.0) == 989.4  # SXM
    assert script.peak_tflops("NVIDIA H100 NVL", 0.0) == 835.5  # not an SXM
    assert script.peak_tflops("NVIDIA H100 PCIe", 0.0) == 756.5
    assert script.peak_tflops("NVIDIA A100-SXM4-40GB", 0.0) == 312.0
    assert script.peak_tflops("NVIDIA H100", 0.0) is None  # no guess from a partial name
    assert "--peak-tflops" in caplog.text
    assert script.peak_tflops("NVIDIA H100", 500.0) == 500.0


def test_train_step_gpu_measures_data_wait_on_real_sized_segments_past_the_prefetch_depth(tmp_path):
    script = load_script("train_step_gpu")
    settings = script.default_settings("cuda")
    assert (settings.clip_frames, settings.resolution) == (240, 512)
    assert settings.steps >= 50 and settings.steps >= 4 * settings.prefetch_depth > 0
    for stage in ("stage1", "stage2"):
        config = script.stage_config(stage, settings, tmp_path / "shards")
        assert config.data.steps_per_epoch >= max(
            10 * settings.prefetch_depth, settings.warmup + settings.steps
        )
        assert config.data.span <= settings.clip_frames  # stage 2's stride-12 window fits a segment


def test_train_step_gpu_wheelhouse_is_the_import_closure_beyond_the_node():
    script = load_script("train_step_gpu")
    # The static closure sees the project's module-level imports, the loader's decoder among them.
    assert {"torch", "av", "cv2", "webdataset", "diffusers"} <= script.third_party_imports()
    assert script.wheelhouse_closure() == sorted(script.WHEELHOUSE)
    assert not set(script.WHEELHOUSE) & set(script.NODE_BINARIES)


def test_train_step_gpu_names_a_missing_package_and_the_wheelhouse():
    # As on a GPU node without the wheelhouse: the loader's decoder cannot be imported.
    hide_av = "import runpy, sys; sys.modules['av'] = None; runpy.run_path(sys.argv[1], run_name='x')"
    script = str(ROOT / "benchmarks" / "train_step_gpu.py")
    result = subprocess.run([sys.executable, "-c", hide_av, script], capture_output=True, text=True)
    assert result.returncode == 1
    assert "module 'av' is not installed" in result.stderr and "make wheelhouse" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_step_gpu_gives_set_device_and_ddp_an_indexed_gpu():
    from torch._utils import _get_device_index

    script = load_script("train_step_gpu")
    assert script.indexed_device("cpu") == "cpu" and script.indexed_device("cuda:1") == "cuda:1"
    # torch.cuda.set_device and DDP's device_ids=[device.index] refuse a bare "cuda" (index None).
    assert _get_device_index(torch.device(script.indexed_device("cuda"))) == 0
