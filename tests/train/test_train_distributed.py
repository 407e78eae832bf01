"""Collectives of the trainer in two real gloo processes: loader counts summed over ranks, and the EMA of
FSDP2-sharded weights gathered and re-sharded (checkpoints across world sizes: test_checkpoint_layout.py)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from train.config import EMAConfig
from train.data import STAT_NAMES
from train.ema import averaged_weights, ema_counters, ema_full_state, load_ema_state, make_ema
from train.loop import sum_counts

WORLD = 2


def _fsdp_ema_round_trip(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _small_model()  # the same start on both ranks, as after a broadcast
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    assert all(hasattr(p, "device_mesh") for p in params)  # sharded DTensors
    ema = make_ema(params, EMAConfig(enabled=True, warmup=False))
    for step in range(3):  # stand-in optimiser steps, identical on both ranks
        with torch.no_grad():
            for p in params:
                p.add_(torch.full_like(p, 0.1 * (step + 1)))
        ema.step(params)
    saved = ema_full_state(ema, names)  # collective: full tensors on every rank
    assert saved["0.weight"].shape == (10, 6)

    with averaged_weights(ema, params):
        inside = {n: p.full_tensor() for n, p in zip(names, params, strict=True)}
    after = {n: p.full_tensor() for n, p in zip(names, params, strict=True)}
    for name in names:
        assert torch.equal(inside[name], saved[name])
        assert not torch.equal(after[name], saved[name])  # the model's own weights came back

    fresh = make_ema(params, EMAConfig(enabled=True, warmup=False))  # starts from the current weights
    load_ema_state(fresh, names, saved.__getitem__, ema_counters(ema))
    assert fresh.optimization_step == 3
    for mine, theirs in zip(fresh.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(mine.to_local(), theirs.to_local())  # this rank's shard, re-sharded exactly
    assert all(torch.equal(saved[n], t) for n, t in ema_full_state(fresh, names).items())


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.SiLU(), nn.Linear(10, 3))


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cpu = torch.device("cpu")
        # Each rank's loader saw different data; the logged totals are the sums, on every rank.
        counts = {"samples": 10 + rank, "too_short": rank, "bad_samples": 2 * rank}
        assert sum_counts(counts, STAT_NAMES, cpu) == {
            "bad_samples": 2, "too_short": 1, "missing_member": 0, "samples": 21,
        }  # fmt: skip
        _fsdp_ema_round_trip(rank)
    finally:
        # FSDP modules, DTensors and the device mesh hold the process group in reference cycles: left to
        # the interpreter's exit, gloo's threads are destroyed while joinable (std::terminate, SIGABRT in
        # about 1 run of 30). Collect them while the interpreter is alive, then destroy the group.
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    # Reached only when every check passed: exit without the interpreter's teardown, where a gloo thread
    # still referenced from elsewhere would abort a process whose work is done.
    os._exit(0)


def test_counts_sum_over_ranks_and_fsdp_ema_round_trips(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
