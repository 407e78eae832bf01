"""The training step and everything it needs that is not Ray: loss, optimiser, wrapping, checkpoints.

A training checkpoint is a folder:

    model/             config.json + model.safetensors: a MegActor checkpoint (animate / stage 2 read it)
    optimizer.pt       AdamW state keyed by parameter name (torch.load(weights_only=True) reads it)
    train_state.json   step, samples seen, data seed / epoch / offset, LR scheduler state
    train_config.json  the TrainConfig that wrote it
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from model.loading import SAVED_MODULES, load_checkpoint, save_checkpoint
from model.megactor import MegActor, MegActorBatch
from train.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainState:
    """Where a run is. The data position is a pure function of (seed, step): see data_position()."""

    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # over all ranks
    seed: int = 0
    epoch: int = 0  # data epoch of the next step
    epoch_offset: int = 0  # batches of that epoch already used
    lr_scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)


def data_position(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, batches of it already used) for the next step: every rank runs steps_per_epoch per epoch."""
    return divmod(step, steps_per_epoch)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and reference dropout of one step depend only on (seed, rank, step), so a
    resumed run draws what the uninterrupted run would have drawn."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + rank * 1_009 + step)


def to_model_batch(batch: dict[str, Any], device: torch.device) -> MegActorBatch:
    def move(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True)

    return MegActorBatch(
        reference=move("reference"),
        driving=move("driving"),
        background_mask=move("background_mask"),
        target=move("target"),
    )


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> MegActor:
    inner = model.module if hasattr(model, "module") else model
    if not isinstance(inner, MegActor):
        raise TypeError(f"expected a MegActor (possibly wrapped in DDP / FSDP), got {type(inner).__name__}")
    return inner


def diffusion_loss(
    model: nn.Module, batch: MegActorBatch, snr_gamma: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """MSE between predicted and true noise (or velocity), optionally min-SNR weighted per sample."""
    output = model(batch, generator)
    error = F.mse_loss(output.prediction.float(), output.target.float(), reduction="none")
    per_sample = error.mean(dim=tuple(range(1, error.ndim)))  # (B,)
    if snr_gamma is None:
        return per_sample.mean()
    megactor = unwrap(model)
    snr = compute_snr(megactor.scheduler, output.timesteps).to(per_sample.device)  # (B,)
    return (per_sample * min_snr_weights(snr, snr_gamma, megactor.config.prediction_type)).mean()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # zero-terminal SNR gives SNR = 0 at t = 999, where min(SNR, gamma) / SNR -> 1
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))


@torch.no_grad()
def evaluation_loss(
    model: nn.Module, batch: MegActorBatch, seed: int = 0, mixed_precision: str = "fp32", repeats: int = 4
) -> float:
    """Loss on a fixed batch with fixed noise and timesteps (eval mode: no reference dropout)."""
    megactor = unwrap(model)
    was_training = megactor.training
    megactor.eval()
    device = batch.reference.device
    losses = []
    for repeat in range(repeats):  # a few noise draws: one draw's loss depends a lot on its timesteps
        with autocast(device, mixed_precision):
            losses.append(float(diffusion_loss(model, batch, None, step_generator(seed, 0, repeat, device))))
    megactor.train(was_training)
    return sum(losses) / len(losses)


def make_optimizer(params: list[nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    if not params:
        raise ValueError("no trainable parameters: check model.config.trainable for this stage")
    return torch.optim.AdamW(
        params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=config.eps
    )


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fsdp_wrap(model: MegActor, device: torch.device) -> nn.Module:
    """FSDP2: shard the trained modules' weights, gradients and AdamW states over the ranks, transformer
    and ResNet blocks first; the frozen VAE and CLIP stay whole on every rank."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for tower in (model.reference_net, model.denoiser):
        # The ReferenceNet's gradients arrive through the reference bank, not through its outputs, so
        # FSDP's pre-backward hooks never re-gather its weights: they stay gathered from forward to
        # backward (its gradients and AdamW states are still sharded).
        keep = tower is model.reference_net
        for block in tower.modules():
            if isinstance(block, (BasicTransformerBlock, ResnetBlock2D)):
                fully_shard(block, mesh=mesh, reshard_after_forward=not keep)
        fully_shard(tower, mesh=mesh, reshard_after_forward=not keep)
    fully_shard(model.driven_encoder, mesh=mesh)
    return model


def wrap_model(model: MegActor, strategy: str, device: torch.device) -> nn.Module:
    """DDP (default) or FSDP across the process group; a single process without one runs unwrapped."""
    model.to(device)
    if not dist.is_initialized():
        return model
    if strategy == "fsdp":
        return fsdp_wrap(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to max_norm over all parameters; under FSDP2 the gradients are sharded DTensors and the norm
    is reduced over every shard."""
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(
    model: nn.Module,
    batch: MegActorBatch,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    config: TrainConfig,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Forward under autocast, backward, clip, AdamW step. Returns loss, grad norm and lr."""
    with autocast(batch.reference.device, config.mixed_precision):
        loss = diffusion_loss(model, batch, config.optim.snr_gamma, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(params, config.optim.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    lr_scheduler.step()
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": float(lr)}


# --- checkpoints ---------------------------------------------------------------------------------------
def save_training_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: TrainConfig,
    rank: int,
) -> None:
    """Every rank calls this (FSDP gathers full states collectively); rank 0 writes the files."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    megactor = unwrap(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = {k: v for k, v in model_state.items() if k.startswith(SAVED_MODULES)}
    save_checkpoint(megactor, out_dir / MODEL_DIR, state=trained)
    torch.save(optimizer_state, out_dir / OPTIMIZER_FILE)
    state.lr_scheduler = lr_scheduler.state_dict()
    (out_dir / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def read_train_state(checkpoint_dir: Path) -> TrainState:
    return TrainState(**json.loads((checkpoint_dir / STATE_FILE).read_text()))


def load_model_weights(model: MegActor, checkpoint_dir: Path) -> None:
    """Before wrapping: the trained modules of a training checkpoint into a freshly built model."""
    load_checkpoint(model, checkpoint_dir / MODEL_DIR)


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    checkpoint_dir: Path,
) -> TrainState:
    """After wrapping: optimiser and scheduler state; returns the run's position."""
    optimizer_state = torch.load(checkpoint_dir / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
    )
    state = read_train_state(checkpoint_dir)
    lr_scheduler.load_state_dict(state.lr_scheduler)
    return state


def checkpoint_step(path: Path) -> int:
    """The step a training checkpoint folder was written at, -1 when it is not one."""
    try:
        return read_train_state(path).step
    except (OSError, json.JSONDecodeError, TypeError):
        return -1


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The training checkpoint with the highest step in a run folder."""
    candidates = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and checkpoint_step(p) >= 0]
    return max(candidates, key=checkpoint_step, default=None)


def resolve_init_checkpoint(init_from: str, storage_path: str) -> Path:
    """A run name under storage_path, a run folder, a training checkpoint or a MegActor checkpoint ->
    the MegActor checkpoint folder (config.json + model.safetensors) to start from."""
    tried = []
    for candidate in (Path(storage_path) / init_from, Path(init_from)):
        tried.append(str(candidate))
        if (candidate / "model.safetensors").is_file():
            return candidate.resolve()
        if (candidate / MODEL_DIR / "model.safetensors").is_file():
            return (candidate / MODEL_DIR).resolve()
        latest = latest_checkpoint(candidate) if candidate.is_dir() else None
        if latest is not None:
            return (latest / MODEL_DIR).resolve()
    raise FileNotFoundError(
        f"model.init_from={init_from!r}: expected a run name under storage_path, a run folder with "
        f"checkpoints, or a checkpoint folder; found none at {tried}. Train stage 1 first."
    )


def batches_after(loader: Iterator[dict[str, Any]], skip: int) -> Iterator[dict[str, Any]]:
    """Drop the first `skip` batches (already trained on before a resume)."""
    for index, batch in enumerate(loader):
        if index >= skip:
            yield batch


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()
