"""Time, memory and saved activations of one MegActor training step (forward + backward + AdamW), JSON out.

    python benchmarks/model_step.py                                    # tiny, CPU, 4 frames x 64 px
    python benchmarks/model_step.py --frames 16 --resolution 128 --steps 2   # the activation figures
    python benchmarks/model_step.py --profile full --device cuda --frames 16 --resolution 512 \\
        --dtype bf16 --peak-tflops 989                                    # H100 SXM dense bf16

Gradient checkpointing modes, each measured in the same run: `off`; `diffusers` (what
`UNetMotionModel.enable_gradient_checkpointing` does alone: resnets and spatial transformers, not the
motion modules; the behaviour before motion modules were checkpointed, the baseline); `motion`
(diffusers' plus every motion module, the model's default). Saved activations = bytes autograd keeps
for backward at the end of the forward pass (unique storages, parameters excluded), counted with
`torch.autograd.graph.saved_tensors_hooks` (model.checkpointing.SavedActivations).

Random weights (nothing is downloaded): timing and memory do not depend on the values. bf16 means
bf16 autocast over fp32 parameters (mixed precision, fp32 AdamW states), what the trainer runs.
MFU = (FLOPs of the step as executed, recompute included, counted by torch's FlopCounterMode) / step
time / peak FLOP/s. The full-size stage-1 / stage-2 step with the trainer's data loader is
benchmarks/train_step_gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpointing import SavedActivations  # noqa: E402
from model.components import build_components  # noqa: E402
from model.config import MegActorConfig  # noqa: E402
from model.megactor import MegActor, MegActorBatch, count  # noqa: E402

log = logging.getLogger("benchmarks.model_step")


def make_batch(batch_size: int, frames: int, pixels: int, device: str, latents: bool) -> MegActorBatch:
    """Random pixels in [-1, 1]; with `latents` the targets come as latents (the trainer's cached path)."""
    reference = torch.rand(batch_size, 3, pixels, pixels, device=device) * 2 - 1
    driving = torch.rand(batch_size, frames, 3, pixels, pixels, device=device) * 2 - 1
    mask = (torch.rand(batch_size, 1, pixels, pixels, device=device) > 0.5).float()
    if latents:
        target_latents = torch.randn(batch_size, frames, 4, pixels // 8, pixels // 8, device=device)
        return MegActorBatch(reference, driving, mask, target_latents=target_latents)
    target = torch.rand(batch_size, frames, 3, pixels, pixels, device=device) * 2 - 1
    return MegActorBatch(reference, driving, mask, target=target)


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; process peak RSS


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CHECKPOINTING_MODES = ("off", "diffusers", "motion")


def measure(args: argparse.Namespace, mode: str) -> dict:
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = MegActorConfig(
        gradient_checkpointing=mode != "off",
        checkpoint_motion_modules=mode == "motion",
        reference_dropout=0.1,
    )
    with torch.device(args.device):
        model = MegActor(config, build_components(args.profile))
    params = model.trainable_parameters(args.stage)
    optimizer = torch.optim.AdamW(
        params.values(), lr=1e-5, weight_decay=1e-2, fused=args.device.startswith("cuda")
    )
    batch = make_batch(args.batch_size, args.frames, args.resolution, args.device, args.latents)
    autocast = (
        torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    model.train()

    def step(meter: SavedActivations | None = None) -> None:
        with autocast, meter.measure() if meter else contextlib.nullcontext():
            out = model(batch)
            loss = F.mse_loss(out.prediction.float(), out.target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meter = SavedActivations(model)
    with FlopCounterMode(display=False) as counter:
        step(meter)  # also the warm-up
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        "gradient_checkpointing": mode,
        "saved_activation_mib": round(meter.total_bytes / 2**20, 1),
        "step_seconds_median": round(seconds, 4),
        "step_seconds_all": [round(t, 4) for t in times],
        "peak_memory_gib": round(peak_memory_gib(args.device), 3),
        "peak_memory_kind": "torch.cuda.max_memory_allocated"
        if args.device.startswith("cuda")
        else "process peak RSS",
        "trainable_parameters": count(params),
        "total_parameters": count(model),
        "step_tflop": round(flops / 1e12, 4),
        "achieved_tflops": round(flops / seconds / 1e12, 4),
    }
    if args.peak_tflops:
        result["mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--stage", default="stage1")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument(
        "--latents", action="store_true", help="targets as cached latents (skip the VAE encoder)"
    )
    parser.add_argument(
        "--checkpointing",
        default=",".join(CHECKPOINTING_MODES),
        help=f"comma-separated modes from {CHECKPOINTING_MODES} (default: all three, same run)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 SXM bf16: 989)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        device_name = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU"
        )
    else:
        device_name = torch.cuda.get_device_name(torch.device(args.device))
    modes = args.checkpointing.split(",")
    unknown = sorted(set(modes) - set(CHECKPOINTING_MODES))
    if unknown:
        raise ValueError(f"--checkpointing: expected modes from {CHECKPOINTING_MODES}, got {unknown}")
    runs = [measure(args, mode) for mode in modes]
    report = {
        "benchmark": "model_step",
        "device": device_name,
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "checkpointing"},
        "runs": runs,
    }
    saved = {run["gradient_checkpointing"]: run["saved_activation_mib"] for run in runs}
    if "diffusers" in saved and "motion" in saved:  # against the baseline measured in this run
        report["saved_activations_motion_vs_diffusers_only"] = round(saved["motion"] / saved["diffusers"], 3)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
