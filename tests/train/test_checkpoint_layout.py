"""Training checkpoints: only trainable state, per-rank DCP shards written asynchronously, resharded across
world sizes, the exported model/ readable by model.loading, and the same on s3:// (a moto server)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from model.loading import SAVED_MODULES, build_megactor, load_megactor
from model.megactor import FROZEN_PREFIXES
from train.checkpoint import (
    MODEL_CONFIG_FILE,
    MODEL_DIR,
    MOMENTS,
    STATE_DIR,
    STATE_FILE,
    Checkpointer,
    latest_checkpoint,
    load_training_model,
    load_training_state,
    resolve_init_checkpoint,
    save_training_checkpoint,
    start_model,
)
from train.config import EMAConfig, TrainConfig, load_train_config
from train.ema import make_ema
from train.loop import TrainState, make_lr_scheduler, make_optimizer, trainable

WORLD = 2
TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"
NO_EXPORT = TrainConfig(export_every=1000)  # the small test models are no MegActor: nothing to export


# --- a small model under FSDP2 at world 2 and plain at world 1 -------------------------------------------
def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.SiLU(), nn.Linear(10, 4))


def _trainer(model: nn.Module):
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return params, optimizer, scheduler, make_ema(params, EMAConfig(enabled=True, warmup=False))


def _steps(model: nn.Module, trainer, first: int, count: int) -> None:
    params, optimizer, scheduler, ema = trainer
    for step in range(first, first + count):
        inputs = torch.linspace(-1, 1, 24).reshape(4, 6) * (step + 1)
        model(inputs).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.step(params)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _everything(model: nn.Module, trainer, moments: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Full tensors of the weights, EMA and AdamW state by name (gathers under FSDP2: a collective); the
    moments rounded through `moments`, as a checkpoint stores them (bf16 by default)."""
    params, optimizer, _, ema = trainer
    out = {}
    for (name, param), shadow in zip(model.named_parameters(), ema.shadow_params, strict=True):
        out[f"weight/{name}"], out[f"ema/{name}"] = _full(param), _full(shadow)
        for key, value in optimizer.state[param].items():
            rounded = key in MOMENTS
            out[f"{key}/{name}"] = _full(value).to(moments).float() if rounded else _full(value)
    return out


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _sharded(rank: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _small()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model


def _world_2(rank: int, base: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{base}/init-{phase}", rank=rank, world_size=WORLD)
    try:
        model = _sharded(rank)
        trainer = _trainer(model)
        if phase == "save":
            _steps(model, trainer, 0, 2)
            checkpointer = Checkpointer(NO_EXPORT, rank)  # asynchronous
            checkpointer.save(f"{base}/w2", model, trainer[1], trainer[2], TrainState(step=2), trainer[3])
            expected = _everything(model, trainer, torch.bfloat16)
            _steps(model, trainer, 2, 1)  # training goes on while the write runs: not in the checkpoint
            assert not Path(f"{base}/w2/{STATE_FILE}").exists()  # committed only once complete
            checkpointer.close()
            if rank == 0:
                torch.save(expected, f"{base}/expected-w2.pt")
        else:
            assert load_training_state(model, trainer[1], trainer[2], f"{base}/w1", trainer[3]).step == 3
            _assert_same(_everything(model, trainer), torch.load(f"{base}/expected-w1.pt"))
            assert trainer[2].last_epoch == 3 and trainer[3].optimization_step == 3
    finally:
        gc.collect()  # FSDP reference cycles hold the group: see test_train_distributed.py
        dist.destroy_process_group()
        gc.collect()
    os._exit(0)


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_one_on_two(tmp_path: Path) -> None:
    """FSDP2 at world 2 -> plain at world 1 -> FSDP2 at world 2: weights, EMA and AdamW step exact, the
    AdamW moments exactly their bf16 rounding (the default checkpoint_moments), back in fp32."""
    mp.spawn(_world_2, args=(str(tmp_path), "save"), nprocs=WORLD, join=True)
    assert sorted(p.name for p in (tmp_path / "w2" / STATE_DIR).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    model = _small()
    trainer = _trainer(model)
    state = load_training_state(model, trainer[1], trainer[2], tmp_path / "w2", trainer[3])
    assert state.step == 2 and trainer[3].optimization_step == 2
    _assert_same(_everything(model, trainer), torch.load(tmp_path / "expected-w2.pt"))

    _steps(model, trainer, 2, 1)
    checkpointer = Checkpointer(NO_EXPORT, rank=0)
    checkpointer.save(str(tmp_path / "w1"), model, trainer[1], trainer[2], TrainState(step=3), trainer[3])
    checkpointer.close()
    torch.save(_everything(model, trainer, torch.bfloat16), tmp_path / "expected-w1.pt")
    mp.spawn(_world_2, args=(str(tmp_path), "load"), nprocs=WORLD, join=True)


# --- the tiny MegActor --------------------------------------------------------------------------------
def _tiny(weights: Path, **overrides: object):
    config = load_train_config("stage1", [TINY], [f"{k}={v}" for k, v in overrides.items()])
    model = build_megactor(weights, config.megactor_config())
    params = list(model.trainable_parameters("stage1").values())
    optimizer = make_optimizer(params, config.optim)
    scheduler = make_lr_scheduler(optimizer, 0)
    ema = make_ema(params, config.ema)
    return config, model, params, optimizer, scheduler, ema


def _perturb(params: list[nn.Parameter], ema, scale: float) -> None:
    """Stand-in optimiser steps: the weights, and so the average, move away from the start."""
    with torch.no_grad():
        for index, param in enumerate(params):
            param.add_(torch.full_like(param, scale * (index % 7 + 1)))
    ema.step(params)


def test_a_checkpoint_holds_only_trainable_state_and_exports_model_when_due(
    tiny_model_weights: Path, tmp_path: Path
) -> None:
    config, model, params, optimizer, scheduler, ema = _tiny(
        tiny_model_weights, **{"ema.enabled": "true", "export_every": 3, "max_steps": 10}
    )
    _perturb(params, ema, 1e-3)
    run = tmp_path / "run"
    save_training_checkpoint(run / "checkpoint_0000003", model, optimizer, scheduler, TrainState(step=3),
                             config, 0, ema)  # fmt: skip
    _perturb(params, ema, 1e-3)
    save_training_checkpoint(run / "checkpoint_0000004", model, optimizer, scheduler, TrainState(step=4),
                             config, 0, ema)  # fmt: skip
    first = run / "checkpoint_0000003"
    assert {p.name for p in first.iterdir()} == {STATE_DIR, MODEL_DIR, STATE_FILE, MODEL_CONFIG_FILE,
                                                 "train_config.json"}  # fmt: skip
    assert not (run / "checkpoint_0000004" / MODEL_DIR).exists()  # export not due at step 4
    assert latest_checkpoint(run) == run / "checkpoint_0000004"
    assert resolve_init_checkpoint("run", str(tmp_path)) == (first / MODEL_DIR).resolve()

    # DCP holds the trainable weights, their AdamW moments and EMA: nothing of the frozen modules.
    names = set(trainable(model))
    saved = FileSystemReader(first / STATE_DIR).read_metadata().state_dict_metadata
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == names
    assert {k.removeprefix("ema.") for k in saved if k.startswith("ema.")} == names
    assert all(k.startswith(("model.", "ema.", "optim.")) for k in saved)
    assert not any(k.split(".", 1)[1].startswith(FROZEN_PREFIXES) for k in saved if "." in k)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    stored = sum(f.stat().st_size for f in (first / STATE_DIR).iterdir())
    # fp32 weights and EMA, 2 AdamW moments in bf16, plus DCP's record per tensor (a small torch.save
    # archive): 3 x the fp32 weights where fp32 moments would make it 4.
    assert 3 * trainable_bytes <= stored < 3 * trainable_bytes + 4096 * len(saved)
    dtypes = {key: meta.properties.dtype for key, meta in saved.items() if hasattr(meta, "properties")}
    moments = {key for key in dtypes if key.endswith((".exp_avg", ".exp_avg_sq"))}
    assert len(moments) == 2 * len(names) and {dtypes[k] for k in moments} == {torch.bfloat16}
    assert {dtypes[k] for k in dtypes if k.startswith(("model.", "ema."))} == {torch.float32}

    # model/ is what model.loading reads: the EMA average for trained tensors, the rest as trained.
    exported = load_file(str(first / MODEL_DIR / "model.safetensors"))
    assert set(exported) == {k for k in model.state_dict() if k.startswith(SAVED_MODULES)}
    animated = load_megactor(tiny_model_weights, first / MODEL_DIR)
    assert animated.config == model.config
    reloaded = animated.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in exported.items())

    # A resume from step 4: weights, AdamW state and EMA exactly as saved.
    fresh = load_training_model(tiny_model_weights, run / "checkpoint_0000004", {})
    fresh_params = list(fresh.trainable_parameters("stage1").values())
    fresh_optimizer = make_optimizer(fresh_params, config.optim)
    fresh_ema = make_ema(fresh_params, config.ema)
    state = load_training_state(fresh, fresh_optimizer, make_lr_scheduler(fresh_optimizer, 0),
                                run / "checkpoint_0000004", fresh_ema)  # fmt: skip
    assert state.step == 4 and fresh_ema.optimization_step == ema.optimization_step == 2
    for a, b, c, d in zip(params, fresh_params, ema.shadow_params, fresh_ema.shadow_params, strict=True):
        assert torch.equal(a, b) and torch.equal(c, d)
    assert json.loads((first / MODEL_CONFIG_FILE).read_text()) == model.config.to_dict()


def test_a_checkpoint_goes_straight_to_s3_and_resumes_from_there(tiny_model_weights: Path) -> None:
    """s3:// storage (a moto server): each rank's file and model/ streamed as objects, no local folder;
    the resume and stage 2's init_from read them back."""
    from s3_helpers import aws_environment, moto_server, object_keys, s3_client

    from train.ray_train import remote_init_checkpoint

    with moto_server() as endpoint, aws_environment(endpoint):
        s3_client().create_bucket(Bucket="ckpt")
        config, model, params, optimizer, scheduler, ema = _tiny(
            tiny_model_weights, **{"ema.enabled": "true"}
        )
        _perturb(params, ema, 1e-3)
        uri = "s3://ckpt/train/run/checkpoint_0000002"
        save_training_checkpoint(uri, model, optimizer, scheduler, TrainState(step=2), config, 0, ema)
        prefix = "train/run/checkpoint_0000002/"
        objects = [key for key in object_keys("ckpt", "train/") if not key.endswith("/")]  # no folder markers
        assert objects == [
            prefix + name
            for name in ("model/config.json", "model/model.safetensors", MODEL_CONFIG_FILE,
                         "state/.metadata", "state/__0_0.distcp", "train_config.json", STATE_FILE)
        ]  # fmt: skip

        fresh = load_training_model(tiny_model_weights, uri, {})
        fresh_params = list(fresh.trainable_parameters("stage1").values())
        fresh_optimizer = make_optimizer(fresh_params, config.optim)
        fresh_ema = make_ema(fresh_params, config.ema)
        load_training_state(fresh, fresh_optimizer, make_lr_scheduler(fresh_optimizer, 0), uri, fresh_ema)
        for a, b, c, d in zip(params, fresh_params, ema.shadow_params, fresh_ema.shadow_params, strict=True):
            assert torch.equal(a, b) and torch.equal(c, d)

        assert remote_init_checkpoint("run", "s3://ckpt/train") == f"{uri}/model"
        stage2 = start_model(tiny_model_weights, f"{uri}/model", {})
        weights = stage2.state_dict()
        for name, shadow in zip(trainable(model), ema.shadow_params, strict=True):
            assert torch.equal(weights[name], shadow), name  # the exported average
