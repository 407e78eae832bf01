"""The training step and everything it needs that is not Ray: loss, optimiser, wrapping, the run's
position. Checkpoints: train/checkpoint.py."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from model.megactor import MegActor, MegActorBatch
from train.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run is. The data position is a pure function of (seed, step): see data_position()."""

    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # over all ranks
    seed: int = 0
    epoch: int = 0  # data epoch of the next step
    epoch_offset: int = 0  # batches of that epoch already used
    lr_scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)
    ema: dict[str, Any] = dataclasses.field(default_factory=dict)  # EMA counters; empty: no EMA saved


def data_position(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, batches of it already used) for the next step: every rank runs steps_per_epoch per epoch."""
    return divmod(step, steps_per_epoch)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 64-bit seed hashed from (seed, rank, step) by numpy's SeedSequence: distinct triples give
    independent streams, where a linear formula (seed * a + rank * b + step) makes rank r at step s
    replay rank 0 at step s + b * r."""
    if min(seed, rank, step) < 0:
        raise ValueError(f"step seed: expected non-negative seed, rank, step, got {seed}, {rank}, {step}")
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and reference dropout of one step depend only on (seed, rank, step), so a
    resumed run draws what the uninterrupted run would have drawn."""
    return torch.Generator(device).manual_seed(step_seed(seed, rank, step))


def to_model_batch(batch: dict[str, Any], device: torch.device) -> MegActorBatch:
    """A loader batch on `device`; with cached latents the target pixels stay behind (the model reads
    the latents instead, so the VAE does not run on the targets or the reference)."""

    def move(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True)

    cached = "target_latents" in batch
    return MegActorBatch(
        reference=move("reference"),
        driving=move("driving"),
        background_mask=move("background_mask"),
        target=None if cached else move("target"),
        target_latents=move("target_latents") if cached else None,
        reference_latent=move("reference_latent") if "reference_latent" in batch else None,
        latent_vae=batch.get("latent_vae"),
    )


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters being trained, by name, in the order of model.parameters() (sharded under FSDP2)."""
    return {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}


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


def adamw_implementation(params: list[nn.Parameter], fused: str | bool) -> dict[str, bool]:
    """AdamW's fused / foreach flags for optim.fused: the fused kernel (one launch for every tensor,
    no intermediate copies) on GPUs under auto, foreach elsewhere."""
    if fused == "auto":
        fused = all(p.device.type == "cuda" for p in params)
    return {"fused": True} if fused else {"foreach": True}


def make_optimizer(params: list[nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    if not params:
        raise ValueError("no trainable parameters: check model.config.trainable for this stage")
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        eps=config.eps,
        **adamw_implementation(params, config.fused),
    )


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fsdp_precision(bf16_params: bool) -> dict[str, Any]:
    """fully_shard's mp_policy: bf16 gathered weights, fp32 gradient reduction; {} when off or when this
    torch has no MixedPrecisionPolicy (the weights are then gathered in fp32)."""
    if not bf16_params:
        return {}
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:
        log.warning(
            "fsdp.bf16_params: torch %s has no MixedPrecisionPolicy; gathering fp32", torch.__version__
        )
        return {}
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


def fsdp_wrap(model: MegActor, device: torch.device, bf16_params: bool = False) -> nn.Module:
    """FSDP2: shard the trained modules' weights, gradients and AdamW states over the ranks, transformer
    and ResNet blocks first; the frozen VAE and CLIP stay whole on every rank."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    precision = fsdp_precision(bf16_params)
    for tower in (model.reference_net, model.denoiser):
        # The ReferenceNet's gradients arrive through the reference bank, not through its outputs, so
        # FSDP's pre-backward hooks never re-gather its weights: they stay gathered from forward to
        # backward (its gradients and AdamW states are still sharded).
        keep = tower is model.reference_net
        for block in tower.modules():
            if isinstance(block, (BasicTransformerBlock, ResnetBlock2D)):
                fully_shard(block, mesh=mesh, reshard_after_forward=not keep, **precision)
        fully_shard(tower, mesh=mesh, reshard_after_forward=not keep, **precision)
    fully_shard(model.driven_encoder, mesh=mesh, **precision)
    return model


def ddp_wrap(module: nn.Module, device: torch.device, grad_compression: str = "none") -> nn.Module:
    """DDP whose gradients are views into its all-reduce buckets (no second gradient-sized copy), with
    the gradients all-reduced in bf16 when grad_compression is bf16."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)
    if grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        ddp.register_comm_hook(None, bf16_compress_hook)
    elif grad_compression != "none":
        raise ValueError(f"ddp.grad_compression: expected none or bf16, got {grad_compression!r}")
    return ddp


def wrap_model(
    model: MegActor,
    strategy: str,
    device: torch.device,
    grad_compression: str = "none",
    fsdp_bf16_params: bool = False,
) -> nn.Module:
    """DDP (default) or FSDP across the process group; a single process without one runs unwrapped."""
    model.to(device)
    if not dist.is_initialized():
        return model
    if strategy == "fsdp":
        return fsdp_wrap(model, device, fsdp_bf16_params)
    return ddp_wrap(model, device, grad_compression)


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


def batches_after(loader: Iterator[dict[str, Any]], skip: int) -> Iterator[dict[str, Any]]:
    """Drop the first `skip` batches (already trained on before a resume)."""
    for index, batch in enumerate(loader):
        if index >= skip:
            yield batch


def sum_counts(counts: dict[str, int], names: tuple[str, ...], device: torch.device) -> dict[str, int]:
    """Per-rank counts summed over all ranks (a collective: every rank calls it at the same step)."""
    values = [int(counts.get(name, 0)) for name in names]
    if not dist.is_initialized():
        return dict(zip(names, values, strict=True))
    tensor = torch.tensor(values, device=device, dtype=torch.int64)
    dist.all_reduce(tensor)
    return dict(zip(names, (int(v) for v in tensor.tolist()), strict=True))


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()
