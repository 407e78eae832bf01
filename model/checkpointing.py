"""Activation checkpointing of the AnimateDiff motion modules, and a meter of saved activations.

diffusers' `UNetMotionModel.enable_gradient_checkpointing()` checkpoints the resnets (and, through
Transformer2DModel, the spatial transformer blocks) of every motion block, but each block then calls its
motion module (`AnimateDiffTransformer3D`) plainly, so the temporal attention of all frames at every
resolution keeps its activations for backward. The block code calls the module directly, so the
checkpoint has to live in the module itself: `checkpoint_motion_modules` switches each motion module's
class to a subclass whose forward runs under `torch.utils.checkpoint`. Parameter names, the state dict and
`isinstance` stay what they were (checkpoints and FSDP wrapping see the same module), and the flag is the
`gradient_checkpointing` attribute diffusers' own enable / disable methods set on every module that has it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedMotionModule(AnimateDiffTransformer3D):
    """An AnimateDiff motion module whose forward is recomputed in backward when checkpointing is on."""

    gradient_checkpointing: bool

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            # Non-reentrant: replays the same autocast state, accepts the int `num_frames` keyword.
            return checkpoint(super().forward, hidden_states, *args, use_reentrant=False, **kwargs)
        return super().forward(hidden_states, *args, **kwargs)


def motion_modules(denoiser: nn.Module) -> list[AnimateDiffTransformer3D]:
    """Every AnimateDiff motion module of a UNetMotionModel."""
    return [m for m in denoiser.modules() if isinstance(m, AnimateDiffTransformer3D)]


def checkpoint_motion_modules(denoiser: nn.Module, enable: bool = True) -> int:
    """Checkpoint (or stop checkpointing) every motion module of `denoiser`; returns how many there are."""
    modules = motion_modules(denoiser)
    if not modules:
        raise ValueError("checkpoint_motion_modules: the denoiser has no AnimateDiff motion modules")
    for module in modules:
        if type(module) is AnimateDiffTransformer3D:
            module.__class__ = CheckpointedMotionModule
        module.gradient_checkpointing = enable
    return len(modules)


class SavedActivations:
    """Bytes autograd keeps for backward while active: unique storages, parameters and buffers excluded.

    Read `total_bytes` after the forward pass (nothing is freed before backward). Storages are counted
    whole, once, however many saved tensors view them. With `inside` set to a module list, `bytes_inside`
    also counts what is saved while each of those modules runs (its own forward, not a recompute).
    """

    def __init__(self, model: nn.Module, inside: list[nn.Module] | None = None) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: set[int] = set()
        self.total_bytes = 0
        self.bytes_inside = 0
        self.depth = 0
        self.inside = inside or []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if tensor.device.type != "meta" and key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total_bytes += storage.nbytes()
            if self.depth:
                self.bytes_inside += storage.nbytes()
        return tensor

    def _enter(self, *_: Any) -> None:
        self.depth += 1

    def _exit(self, *_: Any) -> None:
        self.depth -= 1

    @contextlib.contextmanager
    def measure(self) -> Iterator[SavedActivations]:
        handles = []
        for module in self.inside:
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._exit))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()
