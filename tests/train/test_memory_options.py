"""Memory and speed options of the trainer: AdamW's kernel, DDP's bucket-view gradients and bf16
gradient compression, FSDP2's bf16 gathers, the foreach EMA, persistent DataLoader workers across
data epochs, and the stage configs' gradient checkpointing."""

from __future__ import annotations

import gc
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shard_helpers import write_synthetic_shards
from torch import nn

from train.checkpoint import load_training_state, save_training_checkpoint
from train.config import EMAConfig, OptimConfig, TrainConfig, load_train_config
from train.data import DataConfig, make_loader
from train.ema import make_ema
from train.loop import (
    TrainState,
    ddp_wrap,
    fsdp_precision,
    make_lr_scheduler,
    make_optimizer,
)

CPU = torch.device("cpu")
WORLD = 2


def _params(count: int = 3) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(5, 7)) for _ in range(count)]


# --- AdamW ---------------------------------------------------------------------------------------------
def test_adamw_is_foreach_on_cpu_under_auto_and_fused_when_asked() -> None:
    auto = make_optimizer(_params(), OptimConfig()).param_groups[0]
    assert auto["foreach"] is True and not auto["fused"]
    fused = make_optimizer(_params(), OptimConfig(fused=True)).param_groups[0]
    assert fused["fused"] is True and not fused["foreach"]
    off = make_optimizer(_params(), OptimConfig(fused=False)).param_groups[0]
    assert off["foreach"] is True and not off["fused"]


def test_optim_fused_is_read_from_yaml_values_and_rejects_others() -> None:
    for raw, expected in (("auto", "auto"), ("true", True), ("false", False)):
        assert load_train_config("stage1", overrides=[f"optim.fused={raw}"]).optim.fused == expected
    with pytest.raises(ValueError, match="optim.fused"):
        load_train_config("stage1", overrides=["optim.fused=yes please"])
    with pytest.raises(ValueError, match="optim.fused"):
        OptimConfig(fused=1)


def test_fused_and_foreach_adamw_take_the_same_steps() -> None:
    weights = {}
    for fused in (True, False):
        params = _params()
        optimizer = make_optimizer(params, OptimConfig(fused=fused, lr=1e-2))
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach()
            optimizer.step()
        weights[fused] = [p.detach().clone() for p in params]
    for a, b in zip(weights[True], weights[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_resume_keeps_this_runs_adamw_kernel(tmp_path: Path) -> None:
    """The saved param groups carry the writer's fused / foreach flags; the resuming run's choice wins."""
    model = nn.Linear(4, 3)
    writer = make_optimizer(list(model.parameters()), OptimConfig(fused=False))
    model(torch.randn(2, 4)).sum().backward()
    writer.step()
    # A bare Linear: no MegActor to export; fp32 moments, so the restored ones compare exactly.
    config = TrainConfig(export_every=1000, checkpoint_moments="fp32")
    save_training_checkpoint(
        tmp_path, model, writer, make_lr_scheduler(writer, 0), TrainState(step=1), config, 0
    )
    model.zero_grad(set_to_none=True)  # as in a fresh process
    reader = make_optimizer(list(model.parameters()), OptimConfig(fused=True))
    load_training_state(model, reader, make_lr_scheduler(reader, 0), tmp_path)
    group = reader.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    assert torch.equal(reader.state[model.weight]["exp_avg"], writer.state[model.weight]["exp_avg"])


# --- EMA -----------------------------------------------------------------------------------------------
def test_ema_updates_all_weights_in_one_foreach_pass_equal_to_the_per_weight_loop() -> None:
    """Each step from the same shadow weights: the foreach kernel (s - a * (s - p) in one op) and the
    per-weight loop (a * (s - p) rounded first) agree within 1e-7 for weights in [-0.5, 0.5]."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.rand(64, 33) - 0.5) for _ in range(5)]
    ema = make_ema(params, EMAConfig(enabled=True, warmup=False, decay=0.9))
    assert ema.foreach is True
    for step in range(4):
        with torch.no_grad():
            for p in params:
                p.copy_((p + 0.1 * torch.randn_like(p)).clamp(-0.5, 0.5))
        before = [shadow.clone() for shadow in ema.shadow_params]
        ema.step(params)
        one_minus = 1 - ema.cur_decay_value
        for got, shadow, p in zip(ema.shadow_params, before, params, strict=True):
            want = shadow.sub_(one_minus * (shadow - p.detach()))  # diffusers' per-weight update
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=f"step {step}")


# --- DDP and FSDP in two gloo processes ----------------------------------------------------------------
def _ddp_grads(rank: int, compression: str) -> nn.Linear:
    torch.manual_seed(0)  # the same start on both ranks
    module = nn.Linear(16, 8)
    ddp = ddp_wrap(module, CPU, compression)
    assert ddp.gradient_as_bucket_view
    torch.manual_seed(100 + rank)  # different data per rank
    ddp(torch.randn(4, 16)).square().sum().backward()
    return module


def _check_ddp(rank: int) -> None:
    plain = _ddp_grads(rank, "none")
    # Bucket views: both gradients live in the one all-reduce bucket, not in copies of their own.
    assert plain.weight.grad.untyped_storage().data_ptr() == plain.bias.grad.untyped_storage().data_ptr()
    assert not torch.equal(plain.weight.grad, plain.weight.grad.bfloat16().float())
    compressed = _ddp_grads(rank, "bf16")
    grad = compressed.weight.grad
    assert torch.equal(grad, grad.bfloat16().float())  # all-reduced in bf16
    torch.testing.assert_close(grad, plain.weight.grad, rtol=2e-2, atol=1e-2)


def _check_fsdp_bf16(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    assert fsdp_precision(False) == {}
    mesh = init_device_mesh("cpu", (WORLD,))
    seen: list[torch.dtype] = []
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    module[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype))
    fully_shard(module, mesh=mesh, **fsdp_precision(True))
    module(torch.randn(3, 16)).float().sum().backward()
    assert seen == [torch.bfloat16]  # gathered in bf16 for compute
    for p in module.parameters():  # the shards, their gradients (and so AdamW) stay fp32
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_ddp(rank)
        _check_fsdp_bf16(rank)
    finally:
        gc.collect()  # FSDP state holds the group in reference cycles: free it while gloo is alive
        dist.destroy_process_group()
        gc.collect()
    os._exit(0)  # every check passed: skip the teardown where a stray gloo thread can abort


def test_ddp_gradients_are_bucket_views_bf16_compression_and_fsdp_bf16_gathers(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


# --- persistent DataLoader workers -------------------------------------------------------------------
def _signature(batches: list[dict]) -> list[tuple]:
    return [(b["key"], b["frame_indices"].tolist(), b["reference_index"].tolist()) for b in batches]


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_one_loader_serves_every_epoch_with_the_same_worker_processes(tmp_path: Path) -> None:
    folder = write_synthetic_shards(tmp_path)
    config = DataConfig(shards=str(folder), num_frames=4, stride=3, resolution=32, batch_size=1,
                        num_workers=1, shuffle_buffer=4, steps_per_epoch=4)  # fmt: skip
    before = _children()
    loader = make_loader(config, seed=3, epoch=0, rank=0, world_size=1)
    first = list(loader)
    workers = _children() - before
    assert len(workers) == 1
    loader.set_epoch(1)
    second = list(loader)
    assert _children() - before == workers  # the same process served epoch 1
    assert len(first) == len(second) == 4
    assert _signature(first) != _signature(second)  # the epoch still changes the order and the crops
    fresh = make_loader(config, seed=3, epoch=1, rank=0, world_size=1)
    assert _signature(list(fresh)) == _signature(second)  # and equals a loader started at epoch 1
    loader.set_epoch(0)
    again = list(loader)
    assert _signature(again) == _signature(first)
    del loader, fresh
    gc.collect()


def test_in_process_loader_follows_set_epoch(tmp_path: Path) -> None:
    folder = write_synthetic_shards(tmp_path)
    config = DataConfig(shards=str(folder), num_frames=4, stride=3, resolution=32, batch_size=1,
                        num_workers=0, shuffle_buffer=4, steps_per_epoch=3)  # fmt: skip
    loader = make_loader(config, seed=3, epoch=0, rank=0, world_size=1)
    loader.set_epoch(2)
    assert loader.epoch == 2
    fresh = make_loader(config, seed=3, epoch=2, rank=0, world_size=1)
    assert _signature(list(loader)) == _signature(list(fresh))
    with pytest.raises(ValueError, match="data epoch"):
        loader.set_epoch(-1)


# --- stage configs ---------------------------------------------------------------------------------------
def test_stage_2_trains_without_gradient_checkpointing_stage_1_with_it() -> None:
    assert load_train_config("stage2").megactor_config().gradient_checkpointing is False
    assert load_train_config("stage1").megactor_config().gradient_checkpointing is True
    assert load_train_config("stage1").ddp.grad_compression == "none"
    with pytest.raises(ValueError, match="ddp.grad_compression"):
        load_train_config("stage1", overrides=["ddp.grad_compression=fp8"])
