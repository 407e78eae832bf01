"""Where a stage's model runs, and how much of a shared GPU it may take."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the ONNX-only swap stage needs none of it
    import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an explicit cuda device without CUDA is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return device


def gpu_memory_fraction(gpu_share: float) -> float | None:
    """The share of one GPU's memory an actor may use: its `num_gpus` when that is a fraction (Ray then
    packs several actors on one device, and neither torch's caching allocator nor ONNX Runtime's arena
    knows it), None for whole GPUs or none."""
    share = float(gpu_share)
    return share if 0.0 < share < 1.0 else None


def limit_torch_memory(device: torch.device, gpu_share: float) -> float | None:
    """Cap torch's allocator on `device` at the actor's share; returns the fraction set (None: no cap)."""
    fraction = gpu_memory_fraction(gpu_share)
    if fraction is None or device.type != "cuda":
        return None
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
