"""The full-size stage-1 and stage-2 training step on one GPU: step time, peak memory, MFU, data-wait fraction.

    python benchmarks/train_step_gpu.py --out-dir out/bench-gpu --results benchmarks/RESULTS.md   # GPU, < 8 min
    python benchmarks/train_step_gpu.py --out-dir out/bench-cpu    # no GPU: the tiny model, 4 x 64², CPU

Each stage is what `configs/train/<stage>.yaml` trains: its MegActorConfig (gradient checkpointing on,
motion modules included), its trainable set, its frames and stride (16 x 512², stride 2 / 12), bf16
autocast over fp32 weights and AdamW states; with random full-size weights (nothing is downloaded). The
data come from the trainer's own loader (`train.data.make_loader`, DataLoader workers decoding shards
written in this run by the project's writer: demo-generator talking heads, real + swap), and each step
is the trainer's own `train.loop.train_step` (autocast forward, loss, backward, clipping, AdamW).

Per stage: median step seconds (synchronised), peak GPU memory (`torch.cuda.max_memory_allocated`),
FLOPs of one step as executed (torch FlopCounterMode; recompute of checkpointed blocks included) and
MFU = FLOPs / median step / the device's dense bf16 peak, and the data-wait fraction = time blocked on
the loader / (that + step time) over the measured steps. JSON on stdout and in OUT/train_step.json; a
Markdown section naming the device in OUT/train_step.md, appended to --results when given.
Without CUDA the same code runs on CPU with the tiny profile (the test that keeps the script ready).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.components import build_components  # noqa: E402
from model.megactor import MegActor, count  # noqa: E402
from train.config import TrainConfig, load_train_config  # noqa: E402
from train.data import make_loader  # noqa: E402
from train.loop import make_lr_scheduler, make_optimizer, to_model_batch, train_step  # noqa: E402

log = logging.getLogger("benchmarks.train_step_gpu")

# Dense bf16 peak TFLOP/s by device name (vendor datasheets, no sparsity); the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
STAGES = ("stage1", "stage2")


@dataclasses.dataclass
class Settings:
    device: str
    profile: str  # full on a GPU, tiny on CPU
    frames: int  # per sample
    resolution: int
    mixed_precision: str
    loader_workers: int
    clip_frames: int  # frames per written clip: at least stage 2's span (15 * 12 + 1 = 181 at 16 frames)
    clips: int
    warmup: int
    steps: int


def default_settings(device: str) -> Settings:
    if device.startswith("cuda"):
        return Settings(device, "full", 16, 512, "bf16", 6, 192, 2, 2, 6)
    # CPU: the tiny profile at the tiny overlay's size; fp32 (bf16 autocast on CPU is ~10x slower)
    return Settings(device, "tiny", 4, 64, "fp32", 0, 40, 2, 1, 2)


def load_bench_shard_writer():
    """benchmarks/loader.py's shard writer (benchmarks is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.write_bench_shards


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cores = os.cpu_count()
    return f"{platform.machine()} CPU, {cores} cores, {torch.get_num_threads()} torch threads, no GPU"


def peak_tflops(name: str, override: float) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stage_config(stage: str, settings: Settings, shards: Path, steps_per_epoch: int) -> TrainConfig:
    overrides = [
        f"data.root={shards.parent}",
        f"data.shards={shards}",
        f"data.num_frames={settings.frames}",
        f"data.resolution={settings.resolution}",
        f"data.num_workers={settings.loader_workers}",
        f"data.steps_per_epoch={steps_per_epoch}",
        "data.batch_size=1",
        "data.shuffle_buffer=4",
        f"mixed_precision={settings.mixed_precision}",
        f"model.profile={settings.profile}",
        "model.init_from=null",
    ]
    return load_train_config(stage, overrides=overrides)


def measure_stage(stage: str, settings: Settings, shards: Path, peak: float | None) -> dict:
    device = torch.device(settings.device)
    steps_per_epoch = settings.warmup + settings.steps + 2
    config = stage_config(stage, settings, shards, steps_per_epoch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    build_started = time.perf_counter()
    with torch.device(device):
        model = MegActor(config.megactor_config(), build_components(settings.profile))
    params = model.trainable_parameters(stage)
    model.train()
    optimizer = make_optimizer(list(params.values()), config.optim)
    lr_scheduler = make_lr_scheduler(optimizer, config.optim.warmup_steps)
    build_seconds = time.perf_counter() - build_started

    loader = iter(
        make_loader(config.data, seed=0, epoch=0, rank=0, world_size=1, pin_memory=device.type == "cuda")
    )
    generator = torch.Generator(device).manual_seed(0)

    def one_step(batch: dict) -> None:
        train_step(
            model,
            to_model_batch(batch, device),
            optimizer,
            lr_scheduler,
            list(params.values()),
            config,
            generator,
        )

    first = next(loader)  # starts the DataLoader workers and fills the shuffle buffer: not timed
    with FlopCounterMode(display=False) as counter:
        one_step(first)  # also the first warm-up step
    flops = counter.get_total_flops()
    for _ in range(settings.warmup - 1):
        one_step(next(loader))
    sync(settings.device)
    waits, steps = [], []
    for _ in range(settings.steps):
        started = time.perf_counter()
        batch = next(loader)
        waited = time.perf_counter()
        one_step(batch)
        sync(settings.device)
        waits.append(waited - started)
        steps.append(time.perf_counter() - waited)
    seconds = statistics.median(steps)
    result = {
        "stage": stage,
        "frames": settings.frames,
        "resolution": settings.resolution,
        "stride": config.data.stride,
        "mixed_precision": config.mixed_precision,
        "gradient_checkpointing": model.config.gradient_checkpointing,
        "checkpoint_motion_modules": model.config.checkpoint_motion_modules,
        "trainable_parameters": count(params),
        "total_parameters": count(model),
        "build_seconds": round(build_seconds, 1),
        "step_seconds_median": round(seconds, 3),
        "step_seconds_all": [round(s, 3) for s in steps],
        "data_wait_seconds_all": [round(w, 4) for w in waits],
        "data_wait_fraction": round(sum(waits) / (sum(waits) + sum(steps)), 4),
        "step_tflop": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / seconds / 1e12, 2),
        "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    return result


def markdown(report: dict) -> str:
    peak = report["peak_tflops"]
    mfu_basis = (
        f"MFU counts the step's FLOPs as executed (recompute included) against {peak} TFLOP/s dense bf16."
        if peak
        else "No MFU: no dense bf16 peak is known for this device (give --peak-tflops)."
    )
    lines = [
        f"## Stage-1 and stage-2 training step on one device (`benchmarks/train_step_gpu.py`, {report['date']})",
        "",
        f"Device: **{report['device']}**; torch {report['torch']}; profile `{report['profile']}`, batch 1, "
        f"data from the trainer's loader with {report['loader_workers']} DataLoader workers on shards "
        f"written in the same run. {mfu_basis}",
        "",
        "| stage | frames x pixels (stride) | precision | trainable | step (median) | peak memory | "
        "TFLOP/step | MFU | data wait |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        memory = f"{run['peak_memory_gib']} GiB" if run["peak_memory_gib"] is not None else "n/a (CPU)"
        mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "n/a"
        lines.append(
            f"| {run['stage']} | {run['frames']} x {run['resolution']}² ({run['stride']}) | "
            f"{run['mixed_precision']}, ckpt incl. motion | {run['trainable_parameters'] / 1e6:.1f} M | "
            f"{run['step_seconds_median']} s | {memory} | {run['step_tflop']} | {mfu} | "
            f"{run['data_wait_fraction']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument(
        "--steps", type=int, default=0, help="measured steps per stage (0 = the device default)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="override the device's dense bf16 peak"
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "bench-train-step")
    parser.add_argument("--results", type=Path, default=None, help="append the Markdown section to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = default_settings(args.device)
    if args.steps:
        settings.steps = args.steps
    name = device_name(args.device)
    peak = peak_tflops(name, args.peak_tflops) if args.device.startswith("cuda") else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_seconds = load_bench_shard_writer()(
            shards, settings.clips, settings.clip_frames, settings.resolution
        )
        runs = [measure_stage(stage, settings, shards, peak) for stage in args.stages.split(",")]
    report = {
        "benchmark": "train_step_gpu",
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "profile": settings.profile,
        "loader_workers": settings.loader_workers,
        "peak_tflops": peak,
        "settings": dataclasses.asdict(settings),
        "shard_write_seconds": round(write_seconds, 1),
        "total_seconds": None,
        "runs": runs,
    }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "train_step.json").write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    (args.out_dir / "train_step.md").write_text(section)
    if args.results:
        with args.results.open("a") as results:
            results.write("\n" + section)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
