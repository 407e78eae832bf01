"""EMA of the trainable weights: diffusers' EMAModel over the (DDP or FSDP2-sharded) parameters.

Under FSDP2 each shadow weight is a DTensor sharded like its parameter, so the average costs one
shard per rank; checkpoints hold full tensors by parameter name (gathered and re-sharded here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from train.config import EMAConfig


def make_ema(params: list[nn.Parameter], config: EMAConfig) -> EMAModel:
    """Shadow copies of params (the same sharding), averaged by ema.step(params) after each optimiser step."""
    return EMAModel(
        params,
        decay=config.decay,
        use_ema_warmup=config.warmup,
        power=config.power,
        update_after_step=config.update_after_step,
        foreach=True,  # one kernel per op over all weights, not one per weight
    )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A full CPU tensor; gathers a DTensor (a collective: every rank calls it in the same order)."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().cpu().clone()


def _assign_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into target, taking this rank's shard when target is a DTensor."""
    with torch.no_grad():
        if hasattr(target, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(target.device), target.device_mesh, target.placements)
        target.copy_(full.to(device=target.device, dtype=target.dtype))


def ema_full_state(ema: EMAModel, names: list[str]) -> dict[str, torch.Tensor]:
    """{parameter name: full averaged tensor}; names in the order of the params EMA was made with."""
    if len(names) != len(ema.shadow_params):
        raise ValueError(f"EMA: {len(names)} names for {len(ema.shadow_params)} averaged weights")
    return {name: _full(shadow) for name, shadow in zip(names, ema.shadow_params, strict=True)}


def ema_counters(ema: EMAModel) -> dict[str, Any]:
    """The scalars of the EMA (its step count above all), for train_state.json."""
    return {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}


def load_ema_state(
    ema: EMAModel, names: list[str], read: Callable[[str], torch.Tensor], counters: dict[str, Any]
) -> None:
    """Restore what ema_full_state and ema_counters saved (read(name) gives one full tensor at a time,
    so a rank never holds more than one extra weight), re-sharding under FSDP2."""
    if len(names) != len(ema.shadow_params):
        raise ValueError(f"EMA: {len(names)} names for {len(ema.shadow_params)} averaged weights")
    for name, shadow in zip(names, ema.shadow_params, strict=True):
        _assign_full(shadow, read(name))
    ema.load_state_dict({**counters, "shadow_params": None})


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block the model holds the EMA weights (validation); its own weights come back after."""
    if ema is None:
        yield
        return
    # EMAModel.store / copy_to go through .cpu() and .data, which DTensors on GPUs do not all support.
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for param, shadow in zip(params, ema.shadow_params, strict=True):
            param.copy_(shadow)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, saved in zip(params, own, strict=True):
                param.copy_(saved)
