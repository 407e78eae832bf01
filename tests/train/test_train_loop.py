"""The training step, the loss weighting and training checkpoints, on the tiny model (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shard_helpers import write_synthetic_shards

from model.config import MegActorConfig
from model.loading import SAVED_MODULES, build_megactor, save_checkpoint
from model.megactor import MegActorBatch
from train.checkpoint import (
    CONFIG_FILE,
    MODEL_DIR,
    MOMENT_DTYPES,
    STATE_FILE,
    latest_checkpoint,
    load_training_model,
    load_training_state,
    resolve_init_checkpoint,
    save_training_checkpoint,
)
from train.config import TrainConfig, load_train_config
from train.ema import make_ema
from train.loop import (
    TrainState,
    data_position,
    diffusion_loss,
    evaluation_loss,
    make_lr_scheduler,
    make_optimizer,
    min_snr_weights,
    step_generator,
    train_step,
    trainable,
)
from train.ray_train import build_model, held_out_batch

CPU = torch.device("cpu")
TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


def tiny_config(stage: str = "stage1", **overrides: object) -> TrainConfig:
    items = [f"{k}={v}" for k, v in overrides.items()]
    return load_train_config(stage, [TINY], items)


def setup(weights: Path, config: TrainConfig, model=None):
    torch.manual_seed(0)
    model = model if model is not None else build_megactor(weights, config.megactor_config())
    params = list(model.trainable_parameters(config.stage).values())
    model.train()
    optimizer = make_optimizer(params, config.optim)
    return model, params, optimizer, make_lr_scheduler(optimizer, config.optim.warmup_steps)


def take_step(run: tuple, config: TrainConfig, step: int) -> dict:
    """One training step of (model, params, optimizer, scheduler) on random batch `step`, its noise seeded
    by the step."""
    model, params, optimizer, scheduler = run
    return train_step(model, MegActorBatch.random(step), optimizer, scheduler, params, config,
                      step_generator(0, 0, step, CPU))  # fmt: skip


def test_min_snr_weighting_reduces_to_mse_for_a_huge_gamma(tiny_model_weights: Path) -> None:
    # epsilon: there min(snr, gamma) / snr -> 1 for a huge gamma (v-prediction's weight tends to snr / (snr + 1))
    model, *_ = setup(tiny_model_weights, tiny_config(**{"model.config.prediction_type": "epsilon"}))
    model.eval()
    batch = MegActorBatch.random(0)
    with torch.no_grad():
        plain = diffusion_loss(model, batch, None, step_generator(0, 0, 0, CPU))
        huge = diffusion_loss(model, batch, 1e12, step_generator(0, 0, 0, CPU))
        small = diffusion_loss(model, batch, 1e-3, step_generator(0, 0, 0, CPU))
    assert torch.allclose(plain, huge)
    assert small < plain


def test_min_snr_weights_stay_finite_at_zero_terminal_snr() -> None:
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    epsilon = min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(epsilon, torch.tensor([1.0, 1.0, 1.0, 0.1]))
    assert torch.allclose(
        min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51])
    )


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_a_resumed_run_follows_the_uninterrupted_one(
    moments: str, tiny_model_weights: Path, tmp_path: Path
) -> None:
    """Save after 2 steps, load into a fresh model and optimiser, train 3 more steps on both. fp32 moments:
    every loss and weight the same. bf16 moments (the default): step 3's loss the same (the weights are
    restored exactly), the moments restored as their bf16 rounding, and the weights' change over the 3
    steps within 1 % of the uninterrupted run's."""
    config = tiny_config(**{"optim.warmup_steps": 4, "checkpoint_moments": moments})
    model, params, optimizer, scheduler = run = setup(tiny_model_weights, config)
    for step in range(2):
        take_step(run, config, step)
    state = TrainState(step=2, samples_seen=4, seed=0)
    save_training_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, state, config, rank=0)
    at_save = [p.detach().clone() for p in params]
    saved_moments = [(optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone())
                     for p in params]  # fmt: skip

    rebuilt = load_training_model(tiny_model_weights, tmp_path / "ckpt", {})
    fresh, fresh_params, fresh_optimizer, fresh_scheduler = setup(tiny_model_weights, config, rebuilt)
    restored = load_training_state(fresh, fresh_optimizer, fresh_scheduler, tmp_path / "ckpt")
    assert (restored.step, restored.samples_seen) == (2, 4)
    dtype = MOMENT_DTYPES[moments]
    for param, (exp_avg, exp_avg_sq) in zip(fresh_params, saved_moments, strict=True):
        loaded = fresh_optimizer.state[param]
        assert loaded["exp_avg"].dtype == loaded["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(loaded["exp_avg"], exp_avg.to(dtype).float())
        assert torch.equal(loaded["exp_avg_sq"], exp_avg_sq.to(dtype).float())

    for step in range(2, 5):
        expected = take_step(run, config, step)
        got = take_step((fresh, fresh_params, fresh_optimizer, fresh_scheduler), config, step)
        assert got["lr"] == expected["lr"]
        if step == 2:
            assert got["lr"] < config.optim.lr  # warm-up position restored
        if step == 2 or moments == "fp32":
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    change = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, at_save, strict=True)])
    apart = torch.cat(
        [(a.detach() - b.detach()).flatten() for a, b in zip(params, fresh_params, strict=True)]
    )
    if moments == "fp32":
        assert all(torch.equal(a, b) for a, b in zip(params, fresh_params, strict=True))
    else:
        assert 0 < apart.norm() < 0.01 * change.norm()
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert saved["optim"]["warmup_steps"] == 4 and (tmp_path / "ckpt" / STATE_FILE).is_file()
    assert saved["checkpoint_moments"] == moments


def test_evaluation_loss_is_deterministic_and_restores_train_mode(tiny_model_weights: Path) -> None:
    model, *_ = setup(tiny_model_weights, tiny_config())
    batch = MegActorBatch.random(5)
    first, second = evaluation_loss(model, batch, seed=3), evaluation_loss(model, batch, seed=3)
    assert first == second and model.training
    assert evaluation_loss(model, batch, seed=4) != first


def test_data_position_counts_epochs_and_offsets() -> None:
    assert data_position(0, 3) == (0, 0)
    assert data_position(7, 3) == (2, 1)


def test_init_from_resolves_runs_checkpoints_and_model_folders(
    tiny_model_weights: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    for step in (3, 6):
        ckpt = storage / "stage1" / f"checkpoint_{step:07d}"
        (ckpt / MODEL_DIR).mkdir(parents=True)
        (ckpt / MODEL_DIR / "model.safetensors").write_bytes(b"")
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
    (storage / "stage1" / "checkpoint_manager_snapshot.json").write_text("{}")
    newest = storage / "stage1" / "checkpoint_0000006"
    assert latest_checkpoint(storage / "stage1") == newest
    assert resolve_init_checkpoint("stage1", str(storage)) == (newest / MODEL_DIR).resolve()
    assert resolve_init_checkpoint(
        str(storage / "stage1" / "checkpoint_0000003"), str(storage)
    ).parent.name == ("checkpoint_0000003")
    megactor = tiny_model_weights / "megactor"
    assert resolve_init_checkpoint(str(megactor), str(storage)) == megactor.resolve()
    with pytest.raises(FileNotFoundError, match="Train stage 1 first"):
        resolve_init_checkpoint("stage0", str(storage))


def test_step_seeds_of_eight_ranks_never_collide() -> None:
    """A linear seed formula makes rank r at step s replay another rank's step: 8 ranks x 1500 steps
    must give 12,000 distinct seeds."""
    seeds = {step_generator(3, rank, step, CPU).initial_seed() for rank in range(8) for step in range(1500)}
    assert len(seeds) == 8 * 1500
    assert step_generator(3, 1, 7, CPU).initial_seed() == step_generator(3, 1, 7, CPU).initial_seed()


def test_stage_2_launch_and_relaunch_rebuild_stage_1s_model(tiny_model_weights: Path, tmp_path: Path) -> None:
    """Stage 1 trained with v-prediction, reference dropout 0.3 and the Ada branch: stage 2's first launch
    and its relaunch (or max_failures restart) both rebuild that model and load it key for key."""
    settings = {"prediction_type": "v_prediction", "reference_dropout": 0.3, "driven_ada": True}
    torch.manual_seed(0)
    save_checkpoint(build_megactor(tiny_model_weights, MegActorConfig(**settings)), tmp_path / "stage1")
    config = tiny_config(
        "stage2", **{"model.weights_dir": tiny_model_weights, "model.init_from": tmp_path / "stage1"}
    )
    first = build_model(config)
    params = list(first.trainable_parameters("stage2").values())
    first.train()
    optimizer = make_optimizer(params, config.optim)
    scheduler = make_lr_scheduler(optimizer, 0)
    train_step(
        first, MegActorBatch.random(0), optimizer, scheduler, params, config, step_generator(0, 0, 0, CPU)
    )
    save_training_checkpoint(
        tmp_path / "ckpt", first, optimizer, scheduler, TrainState(step=1), config, rank=0
    )

    resumed = build_model(config, tmp_path / "ckpt")
    resumed_params = list(resumed.trainable_parameters("stage2").values())
    resumed_optimizer = make_optimizer(resumed_params, config.optim)
    load_training_state(
        resumed, resumed_optimizer, make_lr_scheduler(resumed_optimizer, 0), tmp_path / "ckpt"
    )
    for model in (first, resumed):
        assert {k: getattr(model.config, k) for k in settings} == settings
        assert model.config.trainable["stage2"] == ["denoiser.*motion_modules.*", "driven_encoder.*"]
    assert resumed.config == first.config
    before, after = first.state_dict(), resumed.state_dict()
    assert any(k.startswith("driven_encoder.ada.") for k in after)
    for name in (k for k in before if k.startswith(SAVED_MODULES)):
        assert torch.equal(before[name], after[name]), name


def test_ema_survives_a_checkpoint_round_trip_exactly(tiny_model_weights: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"ema.enabled": "true"})
    model, params, optimizer, scheduler = setup(tiny_model_weights, config)
    ema = make_ema(params, config.ema)
    for step in range(3):
        take_step((model, params, optimizer, scheduler), config, step)
        ema.step(params)
    save_training_checkpoint(
        tmp_path / "ckpt", model, optimizer, scheduler, TrainState(step=3), config, 0, ema
    )
    names = list(trainable(model))
    exported = load_file(str(tmp_path / "ckpt" / MODEL_DIR / "model.safetensors"))
    own = {name: param.detach() for name, param in zip(names, params, strict=True)}
    for name, shadow in zip(names, ema.shadow_params, strict=True):
        assert torch.equal(exported[name], shadow), name
    assert (
        sum(not torch.equal(exported[n], own[n]) for n in names) > len(names) // 2
    )  # the average moved less

    fresh = load_training_model(tiny_model_weights, tmp_path / "ckpt", {})
    fresh_params = list(fresh.trainable_parameters("stage1").values())
    fresh.train()
    fresh_optimizer = make_optimizer(fresh_params, config.optim)
    fresh_scheduler = make_lr_scheduler(fresh_optimizer, 0)
    fresh_ema = make_ema(fresh_params, config.ema)
    load_training_state(fresh, fresh_optimizer, fresh_scheduler, tmp_path / "ckpt", fresh_ema)
    assert fresh_ema.optimization_step == ema.optimization_step == 3
    for a, b, c, d in zip(params, fresh_params, ema.shadow_params, fresh_ema.shadow_params, strict=True):
        assert torch.equal(a, b) and torch.equal(c, d)
    for m, p, o, s, e in ((model, params, optimizer, scheduler, ema),
                          (fresh, fresh_params, fresh_optimizer, fresh_scheduler, fresh_ema)):  # fmt: skip
        train_step(m, MegActorBatch.random(3), o, s, p, config, step_generator(0, 0, 3, CPU))
        e.step(p)
    for c, d in zip(ema.shadow_params, fresh_ema.shadow_params, strict=True):
        assert torch.allclose(c, d, atol=1e-6)


def test_validation_reads_held_out_clips_or_warns_and_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_synthetic_shards(tmp_path, samples=2, shards=1, frames=20, split="train")
    config = tiny_config(**{"data.root": tmp_path, "validation.samples": 2})
    with caplog.at_level("WARNING", logger="train"):
        assert held_out_batch(config, rank=0) is None
    assert "held-out validation (loss and video) skipped" in caplog.text and "'val'" in caplog.text
    write_synthetic_shards(tmp_path, samples=1, shards=1, frames=20, split="val", first=5)
    batch = held_out_batch(config, rank=0)
    assert batch is not None and batch["key"] == [
        "synthetic__clip05__s000"
    ]  # the one held-out clip, no train clip
    assert batch["target"].shape[1] == config.data.num_frames
