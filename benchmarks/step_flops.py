"""What one full-size training step costs, counted, for today's settings and the new defaults: JSON out.

    python benchmarks/step_flops.py                       # both stages, full size, meta device (~2 min CPU)
    python benchmarks/step_flops.py --budget-gb 40        # also: what stage 1 would checkpoint on 40 GB

Nothing is timed and nothing is allocated: the model (SD1.5 ReferenceNet + AnimateDiff v3 denoiser +
CLIP + VAE, model.components' `full` profile) is built on the `meta` device, in bf16 (what the trainer's
bf16 autocast computes in), and one step of each stage (configs/train/stage{1,2}.yaml: frames,
resolution, trainable set, gradient checkpointing) runs forward and backward under torch's
FlopCounterMode. Per sample (batch 1 per GPU):

- model TFLOP: forward + backward of what trains, no recompute, no frozen encoders (VAE, CLIP);
- executed TFLOP: everything the step runs: model + recompute (gradient checkpointing) + VAE encode of
  the frames not cached + CLIP;
- saved activation bytes: what autograd keeps for backward at the end of the forward pass, counted with
  saved_tensors_hooks (model.checkpointing.MetaSavedActivations). bf16 everywhere; under real autocast
  the norms and the loss keep some fp32 tensors, and the bf16 weight copies autocast caches for backward
  (2 bytes per trainable parameter) are added as `autocast_weight_copies_gb`. Attention is counted as
  the fused flash kernel a GPU runs (FusedAttention), FLOPs and saved tensors alike;
- fixed memory per GPU: fp32 weights (all, frozen included), fp32 gradients, DDP's bucket copy (a
  second gradient-sized buffer unless gradient_as_bucket_view), AdamW's two fp32 moments (only for the
  parameters that receive a gradient: checked by the meta backward), an fp32 EMA; under DDP and under
  FSDP over --ranks ranks (trained towers sharded, frozen VAE and CLIP whole on every rank);
- checkpoint bytes per save: bytes written to disk per save.

"before" = the settings of the trainer as it was: gradient checkpointing of the whole model in both
stages (diffusers' + motion modules), the VAE encoding 16 targets + the reference inside the step, DDP
without gradient_as_bucket_view, a full checkpoint gathered on rank 0 and written to /tmp and then
copied to storage (both writes counted). "after" = the new defaults: cached target latents (the
reference frame is still encoded in the step), stage 2 without checkpointing, stage 1 checkpointing the
units its config names (model.checkpoint_modules, chosen by `choose_checkpointing` for
model.checkpoint_budget_gb), gradient_as_bucket_view, lean checkpoints (trainable weights + EMA + AdamW
moments, each rank its own shard, written once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpointing import (  # noqa: E402
    MetaSavedActivations,
    UnitCost,
    checkpoint_units,
    choose_checkpointing,
)
from model.components import build_components  # noqa: E402
from model.config import MegActorConfig  # noqa: E402
from model.loading import SAVED_MODULES  # noqa: E402
from model.megactor import FROZEN_PREFIXES, MegActor  # noqa: E402
from train.config import load_train_config  # noqa: E402

log = logging.getLogger("benchmarks.step_flops")
GB = 1e9
FP32, BF16, ADAM_MOMENTS = 4, 2, 2
# Not in the count: the CUDA context, allocator fragmentation and the backward's transient buffers
# (a layer's input gradient, attention workspaces) that the budget must leave room for.
DEFAULT_HEADROOM_GB = 6.0


@dataclass(frozen=True)
class StageShape:
    """What one sample of a stage is: frames of resolution² pixels; profile = model.components profile."""

    stage: str
    frames: int
    resolution: int
    profile: str = "full"
    # Fraction of checkpoint saves that also write model/ (the stage's export_every).
    export_share: float = 1.0
    # Bytes per AdamW moment value in a checkpoint (the stage's checkpoint_moments).
    moment_bytes: int = FP32


@dataclass
class StepCount:
    """One step (batch 1) counted on the meta device."""

    total_flops: int  # everything that ran, forward + backward (+ recompute)
    vae_flops: int
    clip_flops: int
    saved_bytes: int
    params: dict[str, int]  # parameter counts by role
    unit_costs: list[UnitCost]  # filled by the forward-only profile run


class FusedAttention(TorchFunctionMode):
    """Scaled dot-product attention on meta as the fused flash kernel a GPU runs: it keeps q, k, v, the
    output and the log-sum-exp for backward, and its backward recomputes the scores (counted). Without
    this the meta device takes the math path, which keeps the whole attention matrix in fp32."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            query, key, value = args[:3]
            if kwargs.get("attn_mask") is not None or len(args) > 3:
                raise ValueError("FusedAttention: the counted step runs attention without masks")
            flash = torch.ops.aten._scaled_dot_product_flash_attention
            dropout, causal = kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False)
            return flash(query, key, value, dropout, causal, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def run_backward(loss: torch.Tensor) -> None:
    """loss.backward() through the autograd engine directly: Tensor.backward would pass through
    FusedAttention's handler, which runs it with the mode off, so checkpoint recomputes would count
    attention another way than the forward did."""
    grad = (torch.ones_like(loss),)
    _engine_run_backward((loss,), grad, False, False, (), allow_unreachable=True, accumulate_grad=True)


def build_model(config: MegActorConfig, profile: str) -> MegActor:
    """MegActor on the meta device in bf16 (no memory, shapes only)."""
    with torch.device("meta"):
        model = MegActor(config, build_components(profile))
    return model.to(torch.bfloat16)


@contextlib.contextmanager
def flops_inside(
    counter: FlopCounterMode, modules: list[nn.Module], into: dict[str, int], key: str
) -> Iterator:
    """Add to into[key] the FLOPs counted while any of `modules` runs its forward."""
    starts: list[int] = []

    def enter(*_: Any) -> None:
        starts.append(counter.get_total_flops())

    def leave(*_: Any) -> None:
        into[key] = into.get(key, 0) + counter.get_total_flops() - starts.pop()

    handles = [
        h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def meta_batch(shape: StageShape, cached_latents: bool) -> dict[str, torch.Tensor]:
    """The step's inputs as meta tensors: pixels (B=1), or target latents when they are cached."""
    px, frames, dtype = shape.resolution, shape.frames, torch.bfloat16
    batch = {
        "reference": torch.empty(1, 3, px, px, device="meta", dtype=dtype),
        "driving": torch.empty(1, frames, 3, px, px, device="meta", dtype=dtype),
        "background_mask": torch.empty(1, 1, px, px, device="meta", dtype=dtype),
    }
    if cached_latents:
        batch["target_latents"] = torch.empty(1, frames, 4, px // 8, px // 8, device="meta")
    else:
        batch["target"] = torch.empty(1, frames, 3, px, px, device="meta", dtype=dtype)
    return batch


def forward_loss(model: MegActor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MegActor.forward's networks in its order (target VAE encode, condition, DrivenEncoder,
    ReferenceNet, denoiser), without its per-sample reference-dropout test, which reads a value and so
    cannot run on meta; the noising arithmetic around them is elementwise and negligible."""
    latents = batch.get("target_latents")
    if latents is None:
        latents = model.encode_frames(batch["target"])
    condition = model.encode_condition(batch["reference"], batch["background_mask"])
    timesteps = torch.zeros(1, dtype=torch.long, device="meta")
    driven = model.driven_encoder(batch["driving"], None)
    model.write_reference(condition, timesteps, None)
    prediction = model.denoise(latents, timesteps, condition, driven)
    return F.mse_loss(prediction, latents.float())


def parameter_counts(model: MegActor, stage: str) -> dict[str, int]:
    """Parameter counts by role; sets requires_grad for the stage as the trainer does."""
    trained = model.trainable_parameters(stage)
    numel = lambda names: sum(p.numel() for n, p in model.named_parameters() if n in names)  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    return {
        "all": sum(p.numel() for p in model.parameters()),
        "frozen_encoders": numel({n for n in names if n.startswith(FROZEN_PREFIXES)}),
        "saved_modules": numel({n for n in names if n.startswith(SAVED_MODULES)}),
        "trainable": numel(set(trained)),
    }


def count_step(
    model: MegActor,
    shape: StageShape,
    cached_latents: bool,
    backward: bool = True,
    profile_units: bool = False,
) -> StepCount:
    """Count one step; with profile_units (use without checkpointing) also each unit's saved bytes and
    forward FLOPs, what `choose_checkpointing` weighs."""
    params = parameter_counts(model, shape.stage)
    model.train()
    units = checkpoint_units(model) if profile_units else {}
    meter = MetaSavedActivations(model, units)
    inside: dict[str, int] = {}
    batch = meta_batch(shape, cached_latents)
    vae = [model.vae.encoder, model.vae.quant_conv]
    with FlopCounterMode(display=False) as counter, FusedAttention():
        with (
            flops_inside(counter, vae, inside, "vae"),
            flops_inside(counter, [model.background], inside, "clip"),
            unit_flops(counter, units, inside),
            meter.measure(),
        ):
            loss = forward_loss(model, batch)
        if backward:
            run_backward(loss)
    if backward:
        received = sum(p.numel() for p in model.parameters() if p.grad is not None)
        params["receive_gradient"] = received
        model.zero_grad(set_to_none=True)
    costs = [
        UnitCost(name, max(meter.unit_bytes[name] - meter.unit_input_bytes[name], 0), inside.get(name, 0))
        for name in units
    ]
    return StepCount(
        counter.get_total_flops(),
        inside.get("vae", 0),
        inside.get("clip", 0),
        meter.total_bytes,
        params,
        costs,
    )


def count_model_step(config: MegActorConfig, shape: StageShape) -> StepCount:
    """One step as the model alone costs it: no checkpointing (no recompute) and the target latents
    given; `model_flops_of` then drops the frozen encoders (the reference frame's VAE encode, CLIP)."""
    plain = replace(config, gradient_checkpointing=False)
    return count_step(build_model(plain, shape.profile), shape, cached_latents=True)


def model_flops_of(step: StepCount) -> int:
    """Model FLOPs (what MFU counts): forward + backward of what trains, without the frozen encoders."""
    return step.total_flops - step.vae_flops - step.clip_flops


@contextlib.contextmanager
def unit_flops(counter: FlopCounterMode, units: dict[str, list[nn.Module]], into: dict[str, int]) -> Iterator:
    with contextlib.ExitStack() as stack:
        for name, modules in units.items():
            stack.enter_context(flops_inside(counter, modules, into, name))
        yield


# --- memory and checkpoint arithmetic ---------------------------------------------------------------------
def fixed_memory(
    params: dict[str, int], bucket_copy: bool, ema: bool, ranks: int = 1, fsdp: bool = False
) -> dict:
    """Bytes per GPU that live for the whole run, by part (GB)."""
    trained, adam = params["trainable"], params["receive_gradient"]
    towers = params["all"] - params["frozen_encoders"]
    shard = ranks if fsdp else 1
    parts = {
        "weights": FP32 * (params["frozen_encoders"] + towers / shard),
        "grads": FP32 * trained / shard,
        "bucket_copy": FP32 * trained if bucket_copy and not fsdp else 0,
        "adamw": FP32 * ADAM_MOMENTS * adam / shard,
        "ema": FP32 * trained / shard if ema else 0,
    }
    parts["total"] = sum(parts.values())
    return {k: significant(v / GB) for k, v in parts.items()}


def checkpoint_bytes(params: dict[str, int], lean: bool, ema: bool, moment_bytes: int = FP32) -> dict:
    """Bytes written per save. Full: model/ (every ReferenceNet, denoiser and DrivenEncoder weight),
    the optimiser's own weights beside the exported EMA, fp32 AdamW moments; into /tmp, then copied to
    storage (twice). Lean: trainable weights, EMA, AdamW moments at `moment_bytes` each, each rank its
    shard, once; plus, when an export is due, model/ (every saved-module weight, the EMA average in place
    of trained ones), counted apart."""
    trained, adam = params["trainable"], params["receive_gradient"]
    if lean:
        files = {
            "weights": FP32 * trained,
            "ema": FP32 * trained if ema else 0,
            "adamw": moment_bytes * ADAM_MOMENTS * adam,
        }
        copies = 1
        export = FP32 * params["saved_modules"]
    else:
        files = {
            "model": FP32 * params["saved_modules"],
            "own_weights_beside_ema": FP32 * trained if ema else 0,
            "adamw": FP32 * ADAM_MOMENTS * adam,
        }
        copies = 2  # TemporaryDirectory under /tmp, then Ray copies it to storage_path
        export = 0  # model/ is part of every save above
    once = sum(files.values())
    return {
        "files_gb": {k: significant(v / GB) for k, v in files.items()},
        "writes": copies,
        "bytes": once * copies,
        "export_bytes": export,
    }


def per_save(files: dict, export_share: float) -> int:
    """Bytes of a checkpoint_bytes() result per save when `export_share` of the saves also export."""
    return int(files["bytes"] + export_share * files["export_bytes"])


# --- the stages --------------------------------------------------------------------------------------------
def stage_configs(stage: str) -> tuple[MegActorConfig, MegActorConfig, StageShape]:
    """(before, after) model configs of a stage, and its sample shape, from configs/train/<stage>.yaml."""
    train = load_train_config(stage)
    after = train.megactor_config()
    every = train.export_every
    share = 1.0 if every == 0 else min(1.0, train.checkpoint_every / every)
    before = replace(
        after, gradient_checkpointing=True, checkpoint_motion_modules=True, checkpoint_modules=[]
    )
    moments = BF16 if train.checkpoint_moments == "bf16" else FP32
    shape = StageShape(stage, train.data.num_frames, train.data.resolution, export_share=share,
                       moment_bytes=moments)  # fmt: skip
    return before, after, shape


def peak_estimate_bytes(step: StepCount, fixed_gb: float, headroom_gb: float) -> dict:
    weight_copies = BF16 * step.params["trainable"]
    total = fixed_gb * GB + step.saved_bytes + weight_copies + headroom_gb * GB
    return {"autocast_weight_copies_gb": round(weight_copies / GB, 3), "peak_gb": round(total / GB, 2)}


def choose_for_budget(profile: StepCount, fixed_gb: float, budget_gb: float, headroom_gb: float) -> dict:
    """The fewest units (best saving per recompute FLOP first) that fit the step in budget_gb."""
    peak = peak_estimate_bytes(profile, fixed_gb, headroom_gb)
    need = int(peak["peak_gb"] * GB - budget_gb * GB)
    try:
        chosen, error = choose_checkpointing(profile.unit_costs, need), None
    except ValueError as exc:  # the step does not fit even fully checkpointed: say so in the report
        chosen, error = [], str(exc)
    saved = sum(u.saved_bytes for u in profile.unit_costs if u.name in chosen)
    recompute = sum(u.recompute_flops for u in profile.unit_costs if u.name in chosen)
    return {
        "budget_gb": budget_gb,
        "headroom_gb": headroom_gb,
        "peak_without_checkpointing_gb": peak["peak_gb"],
        "must_save_gb": round(max(need, 0) / GB, 2),
        "chosen": chosen if error is None else None,
        "does_not_fit": error,
        "saves_gb": round(saved / GB, 2),
        "recompute_tflop": round(recompute / 1e12, 3),
        "units": {
            u.name: {
                "saved_gb": significant(u.saved_bytes / GB, 4),
                "forward_tflop": significant(u.recompute_flops / 1e12, 4),
            }
            for u in sorted(profile.unit_costs, key=lambda u: -u.saved_bytes)
        },
    }


def ratio(before: float, after: float) -> float:
    return round(after / before, 4) if before else 0.0


def significant(value: float, digits: int = 5) -> float:
    """Rounded to significant digits, so the tiny profile's counts do not round to 0."""
    return float(f"{value:.{digits}g}")


def before_after(before: float, after: float) -> dict:
    keep = (lambda v: v) if isinstance(before, int) else significant  # noqa: E731
    return {"before": keep(before), "after": keep(after), "ratio": ratio(before, after)}


def count_stage(
    shape: StageShape,
    before: MegActorConfig,
    after: MegActorConfig,
    ema: bool,
    ranks: int,
    budget_gb: float,
    headroom_gb: float,
) -> dict:
    """One stage, before and after, in the same run."""
    started = time.perf_counter()
    plain = replace(after, gradient_checkpointing=False)
    profile = count_step(
        build_model(plain, shape.profile), shape, cached_latents=True, backward=False, profile_units=True
    )
    model_step = count_model_step(after, shape)
    old = count_step(build_model(before, shape.profile), shape, cached_latents=False)
    new = count_step(build_model(after, shape.profile), shape, cached_latents=True)
    params = new.params
    fixed = {
        "before": fixed_memory(old.params, bucket_copy=True, ema=ema),
        "after": fixed_memory(params, bucket_copy=False, ema=ema),
    }
    fsdp = fixed_memory(params, bucket_copy=False, ema=ema, ranks=ranks, fsdp=True)
    model_flops = model_flops_of(model_step)
    ckpt = {
        "before": checkpoint_bytes(old.params, lean=False, ema=ema),
        "after": checkpoint_bytes(params, lean=True, ema=ema, moment_bytes=shape.moment_bytes),
        "after_fp32_moments": checkpoint_bytes(params, lean=True, ema=ema),
    }
    saved_before = int(ckpt["before"]["bytes"])
    tflop = lambda f: f / 1e12  # noqa: E731
    return {
        "frames": shape.frames,
        "resolution": shape.resolution,
        "parameters": params,
        "parameters_without_gradient": params["trainable"] - params["receive_gradient"],
        "model_tflop_per_sample": significant(tflop(model_flops)),
        "executed_tflop_per_sample": before_after(tflop(old.total_flops), tflop(new.total_flops)),
        "recompute_tflop_per_sample": before_after(
            tflop(old.total_flops - model_flops - old.vae_flops - old.clip_flops),
            tflop(new.total_flops - model_flops - new.vae_flops - new.clip_flops),
        ),
        "vae_tflop_per_sample": before_after(tflop(old.vae_flops), tflop(new.vae_flops)),
        "clip_tflop_per_sample": significant(tflop(new.clip_flops)),
        "saved_activation_gb": before_after(old.saved_bytes / GB, new.saved_bytes / GB),
        "saved_activation_gb_without_checkpointing": significant(profile.saved_bytes / GB),
        "fixed_memory_gb_ddp": before_after(fixed["before"]["total"], fixed["after"]["total"]),
        "fixed_memory_ddp_parts_gb": fixed,
        "fixed_memory_gb_fsdp": {"ranks": ranks, **fsdp},
        "peak_estimate_ddp_after": peak_estimate_bytes(new, fixed["after"]["total"], headroom_gb),
        # Mean over saves at the stage's export cadence; the two kinds of save apart below.
        "checkpoint_bytes_per_save": before_after(saved_before, per_save(ckpt["after"], shape.export_share)),
        "checkpoint_bytes_per_save_without_export": before_after(saved_before, per_save(ckpt["after"], 0)),
        "checkpoint_bytes_per_save_with_export": before_after(saved_before, per_save(ckpt["after"], 1)),
        # checkpoint_moments: fp32 (a resume restores every bit), same export cadence.
        "checkpoint_bytes_per_save_fp32_moments": before_after(
            saved_before, per_save(ckpt["after_fp32_moments"], shape.export_share)
        ),
        "exports_per_save": shape.export_share,
        "moment_bytes": shape.moment_bytes,
        "checkpoint_files": ckpt,
        "checkpointing": {
            "before": "whole model (diffusers' + motion modules)" if before.gradient_checkpointing else "off",
            "after": describe_checkpointing(after),
            "budget_choice": choose_for_budget(profile, fixed["after"]["total"], budget_gb, headroom_gb),
        },
        "count_seconds": round(time.perf_counter() - started, 1),
    }


def describe_checkpointing(config: MegActorConfig) -> Any:
    if not config.gradient_checkpointing:
        return "off"
    return list(config.checkpoint_modules) or "whole model (diffusers' + motion modules)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--ranks", type=int, default=8, help="world size for the FSDP figures")
    parser.add_argument("--no-ema", action="store_true", help="count without the EMA copy")
    parser.add_argument("--budget-gb", type=float, help="GPU memory for the checkpointing choice "
                        "(default: stage 1's model.checkpoint_budget_gb, else 80)")  # fmt: skip
    parser.add_argument("--headroom-gb", type=float, default=DEFAULT_HEADROOM_GB)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report: dict[str, Any] = {
        "benchmark": "step_flops",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU, counts on meta device",
        "torch": torch.__version__,
        "ema": not args.no_ema,
    }
    for stage in args.stages:
        before, after, shape = stage_configs(stage)
        budget = args.budget_gb or after.checkpoint_budget_gb or 80.0
        report[stage] = count_stage(
            shape, before, after, not args.no_ema, args.ranks, budget, args.headroom_gb
        )
    report["ratios"] = {
        stage: {
            k: report[stage][k]["ratio"]
            for k in ("executed_tflop_per_sample", "checkpoint_bytes_per_save", "fixed_memory_gb_ddp")
        }
        for stage in args.stages
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
