"""Activation checkpointing of the AnimateDiff motion modules, and a meter of saved activations.

diffusers' `UNetMotionModel.enable_gradient_checkpointing()` checkpoints the resnets (and, through
Transformer2DModel, the spatial transformer blocks) of every motion block, but each block then calls its
motion module (`AnimateDiffTransformer3D`) plainly, so the temporal attention of all frames at every
resolution keeps its activations for backward. The block code calls the module directly, so the
checkpoint has to live in the module itself: `checkpoint_motion_modules` switches each motion module's
class to a subclass whose forward runs under `torch.utils.checkpoint`. Parameter names, the state dict and
`isinstance` stay what they were (checkpoints and FSDP wrapping see the same module), and the flag is the
`gradient_checkpointing` attribute diffusers' own enable / disable methods set on every module that has it.

Per-module mode (MegActorConfig.checkpoint_modules): only the listed units are checkpointed, a unit
being one block module list (its resnets, spatial transformers or motion modules) of the ReferenceNet or
the denoiser. `choose_checkpointing` picks the list from per-unit saved bytes and forward FLOPs, counted on
the meta device with `MetaSavedActivations` (benchmarks/step_flops.py), for a memory budget.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def counting_saved(pack: Callable[[torch.Tensor], torch.Tensor], handles: list[Any]) -> Iterator[None]:
    """`pack` sees every tensor autograd saves for backward; the module hooks in `handles` are removed
    on the way out."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
    finally:
        for handle in handles:
            handle.remove()


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
        with counting_saved(self._pack, handles):
            yield self


# --- per-module checkpointing ------------------------------------------------------------------------------
# A checkpointing unit is one module list of a UNet block: its resnets, its spatial transformers
# ("attentions") or its AnimateDiff motion modules, named by path, e.g. "denoiser.up_blocks.3.motion_modules".
# Each member of a chosen list runs its forward under torch.utils.checkpoint.
UNIT_LISTS = ("resnets", "attentions", "motion_modules")
UNIT_TOWERS = ("reference_net", "denoiser")
_checkpointed_classes: dict[type, type] = {}


def checkpoint_units(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Unit path -> its modules, for every block module list of the ReferenceNet and the denoiser."""
    units: dict[str, list[nn.Module]] = {}
    for tower in UNIT_TOWERS:
        for name, module in getattr(model, tower).named_modules():
            parts = name.split(".")
            in_block = parts[0] in ("down_blocks", "up_blocks", "mid_block")
            if in_block and parts[-1] in UNIT_LISTS and isinstance(module, nn.ModuleList) and len(module):
                units[f"{tower}.{name}"] = list(module)
    return units


def match_units(units: list[str], patterns: list[str]) -> list[str]:
    """Units matched by fnmatch patterns (a pattern also matches every unit below a path it names).

    A list is chosen for one architecture (the full model); on another (the tiny profile has two
    blocks a side) a pattern may name a unit that is not there: it is skipped with a warning. A list
    that matches nothing at all raises ValueError, so a typo never silently switches checkpointing off.
    """
    chosen, unmatched = set(), []
    for pattern in patterns:
        hits = [u for u in units if fnmatch.fnmatchcase(u, pattern) or u.startswith(pattern + ".")]
        chosen.update(hits)
        if not hits:
            unmatched.append(pattern)
    hint = f"units are paths like {units[:3]} ({len(units)} in all; a glob such as 'denoiser.*.motion_modules' works)"
    if not chosen:
        raise ValueError(f"checkpoint_modules: {unmatched} match no unit of this model; {hint}")
    if unmatched:
        log.warning("checkpoint_modules: %s match no unit of this model, skipped; %s", unmatched, hint)
    return [u for u in units if u in chosen]


def _checkpointed_class(cls: type) -> type:
    """`cls` with a forward that runs under a non-reentrant checkpoint while `checkpoint_forward` is set."""
    if cls in _checkpointed_classes.values():
        return cls
    if cls not in _checkpointed_classes:
        parent_forward = cls.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and self.checkpoint_forward:
                return checkpoint(parent_forward, self, *args, use_reentrant=False, **kwargs)
            return parent_forward(self, *args, **kwargs)

        name = f"Checkpointed{cls.__name__}"
        _checkpointed_classes[cls] = type(name, (cls,), {"forward": forward, "__module__": __name__})
    return _checkpointed_classes[cls]


def checkpoint_module(module: nn.Module, enable: bool = True) -> None:
    """Recompute `module`'s forward in backward; parameter names, state dict and isinstance stay."""
    module.__class__ = _checkpointed_class(type(module))
    module.checkpoint_forward = enable


def apply_gradient_checkpointing(model: nn.Module, config: Any) -> list[str]:
    """Switch on what `config` asks for; returns the checkpointed unit paths (all of them in the
    whole-model mode).

    config.gradient_checkpointing off: nothing. On with an empty config.checkpoint_modules: diffusers'
    checkpointing of both UNets, plus the motion modules when config.checkpoint_motion_modules. On
    with a list: only the units it matches, each module list member checkpointed whole (diffusers' own
    flags stay off, so nothing is checkpointed twice).
    """
    if not config.gradient_checkpointing:
        return []
    units = checkpoint_units(model)
    if not config.checkpoint_modules:
        model.reference_net.enable_gradient_checkpointing()
        model.denoiser.enable_gradient_checkpointing()
        if config.checkpoint_motion_modules:
            checkpoint_motion_modules(model.denoiser)
        return list(units)
    chosen = match_units(list(units), list(config.checkpoint_modules))
    for name in chosen:
        for module in units[name]:
            checkpoint_module(module)
    return chosen


# --- choosing what to checkpoint from a memory budget ----------------------------------------------------
@dataclass(frozen=True)
class UnitCost:
    """What checkpointing one unit saves (bytes of activations no longer kept) and costs (its forward
    FLOPs, run again in backward)."""

    name: str
    saved_bytes: int
    recompute_flops: int


def choose_checkpointing(units: list[UnitCost], need_bytes: int) -> list[str]:
    """The units to checkpoint so that at least `need_bytes` of saved activations go: largest saving per
    recompute FLOP first, stopping as soon as enough is saved. [] when nothing needs to go.

    Raises ValueError when checkpointing every unit still saves too little: the step cannot fit.
    """
    if need_bytes <= 0:
        return []
    order = sorted(units, key=lambda u: (-u.saved_bytes / max(u.recompute_flops, 1), u.name))
    chosen, saved = [], 0
    for unit in order:
        if saved >= need_bytes:
            break
        if unit.saved_bytes > 0:
            chosen.append(unit.name)
            saved += unit.saved_bytes
    if saved < need_bytes:
        raise ValueError(
            f"checkpointing every unit saves {saved / 1e9:.2f} GB of the {need_bytes / 1e9:.2f} GB needed: "
            "the step does not fit the budget; use a larger GPU, FSDP, or fewer frames"
        )
    return chosen


# --- saved activations on the meta device ------------------------------------------------------------------
class MetaSavedActivations:
    """Bytes autograd keeps for backward, on any device (meta included, where storages have no address).

    Tensors are told apart by their view base, held alive while measuring so an id is never reused;
    parameters and views of them are excluded. With `units` (path -> modules), also the bytes saved
    while each unit runs (`unit_bytes`) and the bytes of its modules' tensor inputs (`unit_input_bytes`,
    what a checkpoint keeps instead).
    """

    def __init__(self, model: nn.Module, units: dict[str, list[nn.Module]] | None = None) -> None:
        self.exclude = {id(t) for t in [*model.parameters(), *model.buffers()]}
        self.held: dict[int, torch.Tensor] = {}
        self.total_bytes = 0
        self.units = units or {}
        self.unit_bytes = dict.fromkeys(self.units, 0)
        self.unit_input_bytes = dict.fromkeys(self.units, 0)
        self.active: list[str] = []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        key = id(base)
        if key not in self.exclude and key not in self.held:
            self.held[key] = base
            size = base.numel() * base.element_size()
            self.total_bytes += size
            for name in set(self.active):
                self.unit_bytes[name] += size
        return tensor

    @contextlib.contextmanager
    def measure(self) -> Iterator[MetaSavedActivations]:
        handles = []
        for name, modules in self.units.items():
            for module in modules:
                handles.append(module.register_forward_pre_hook(self._entering(name), with_kwargs=True))
                handles.append(module.register_forward_hook(self._leaving))
        try:
            with counting_saved(self._pack, handles):
                yield self
        finally:
            self.held.clear()

    def _leaving(self, *_: Any) -> None:
        self.active.pop()

    def _entering(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.active.append(name)
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            self.unit_input_bytes[name] += sum(t.numel() * t.element_size() for t in tensors)

        return hook
