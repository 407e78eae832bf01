"""Gradient checkpointing reaches the AnimateDiff motion modules, saves less and keeps the gradients."""

import pytest
import torch
import torch.nn.functional as F
from model_helpers import make_batch, perturb_

from model.checkpointing import (
    CheckpointedMotionModule,
    SavedActivations,
    UnitCost,
    checkpoint_units,
    choose_checkpointing,
    match_units,
    motion_modules,
)
from model.config import MegActorConfig

GB = 10**9


def saved_and_grads(model, seed: int = 0) -> tuple[SavedActivations, torch.Tensor]:
    perturb_(model)
    params = model.trainable_parameters("stage1")
    meter = SavedActivations(model, inside=motion_modules(model.denoiser))
    with meter.measure():
        out = model.train()(make_batch(batch_size=1), generator=torch.Generator().manual_seed(seed))
        loss = F.mse_loss(out.prediction, out.target)
    loss.backward()
    return meter, torch.cat([p.grad.flatten() for p in params.values()])


def motion_input_bytes(model) -> int:
    """Bytes of the hidden states entering every motion module (what a checkpoint must keep)."""
    sizes = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].nbytes))
        for m in motion_modules(model.denoiser)
    ]
    with torch.no_grad():
        model.eval()(make_batch(batch_size=1), generator=torch.Generator().manual_seed(0))
    for hook in hooks:
        hook.remove()
    return sum(sizes)


def test_checkpointed_motion_modules_keep_only_their_inputs(make_model):
    model = make_model(reference_dropout=0.0, gradient_checkpointing=True)
    inputs = motion_input_bytes(model)
    meter, _ = saved_and_grads(model)
    plain, _ = saved_and_grads(make_model(reference_dropout=0.0))
    assert meter.bytes_inside <= inputs < plain.bytes_inside / 5, (
        meter.bytes_inside,
        inputs,
        plain.bytes_inside,
    )
    assert all(
        isinstance(m, CheckpointedMotionModule) and m.gradient_checkpointing
        for m in motion_modules(model.denoiser)
    )


def test_motion_checkpointing_saves_less_than_diffusers_alone_with_equal_gradients(make_model):
    runs = {
        "off": make_model(reference_dropout=0.0),
        "diffusers only": make_model(
            reference_dropout=0.0, gradient_checkpointing=True, checkpoint_motion_modules=False
        ),
        "with motion modules": make_model(reference_dropout=0.0, gradient_checkpointing=True),
    }
    results = {name: saved_and_grads(model) for name, model in runs.items()}
    saved = {name: meter.total_bytes for name, (meter, _) in results.items()}
    assert saved["with motion modules"] < 0.8 * saved["diffusers only"] < 0.8 * saved["off"], saved
    for name in ("diffusers only", "with motion modules"):
        torch.testing.assert_close(results[name][1], results["off"][1], rtol=1e-4, atol=1e-6)


def test_diffusers_disable_switches_motion_checkpointing_off(make_model):
    model = make_model(gradient_checkpointing=True)
    model.denoiser.disable_gradient_checkpointing()
    assert not any(m.gradient_checkpointing for m in motion_modules(model.denoiser))
    assert model.denoiser.state_dict().keys() == make_model().denoiser.state_dict().keys()  # same names


# --- per-module checkpointing ------------------------------------------------------------------------------
def test_chooser_takes_the_best_saving_per_recompute_flop_until_enough():
    tb = 10**12
    units = [
        UnitCost("a", 10 * GB, 10 * tb),  # 1 GB per TFLOP
        UnitCost("b", 6 * GB, 2 * tb),  # 3
        UnitCost("c", 4 * GB, 1 * tb),  # 4
        UnitCost("d", 8 * GB, 16 * tb),  # 0.5
    ]
    assert choose_checkpointing(units, 0) == []
    assert choose_checkpointing(units, 3 * GB) == ["c"]
    assert choose_checkpointing(units, 9 * GB) == ["c", "b"]  # 10 GB saved, a alone would cost 10 TFLOP
    assert choose_checkpointing(units, 12 * GB) == ["c", "b", "a"]
    assert choose_checkpointing(units, 28 * GB) == ["c", "b", "a", "d"]
    with pytest.raises(ValueError, match="does not fit"):
        choose_checkpointing(units, 29 * GB)


def forward_calls(model) -> tuple[dict[str, int], torch.Tensor]:
    """Runs of each unit's members during one training step, recomputes included (a recompute calls
    the member's forward directly, so the count is taken on the first layer inside it)."""
    calls: dict[str, int] = {}
    units = checkpoint_units(model)
    for name, modules in units.items():
        for module in modules:
            next(module.children()).register_forward_pre_hook(
                lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
            )
    _, grads = saved_and_grads(model)
    return calls, grads


def test_listed_units_recompute_and_the_others_run_once(make_model):
    listed = ["denoiser.*.motion_modules", "reference_net.down_blocks.0.resnets"]
    model = make_model(reference_dropout=0.0, gradient_checkpointing=True, checkpoint_modules=listed)
    chosen = match_units(list(checkpoint_units(model)), listed)
    assert model.checkpointed_units == chosen and "reference_net.down_blocks.0.resnets" in chosen
    assert any(name.endswith("motion_modules") for name in chosen)
    calls, grads = forward_calls(model)
    members = {name: len(modules) for name, modules in checkpoint_units(model).items()}
    expected = {name: count * (2 if name in chosen else 1) for name, count in members.items()}
    assert calls == expected  # diffusers' own checkpointing stays off: nothing else runs twice
    _, plain = saved_and_grads(make_model(reference_dropout=0.0))
    torch.testing.assert_close(grads, plain, rtol=1e-4, atol=1e-6)


def test_a_checkpoint_list_that_matches_nothing_is_an_error_a_partial_one_is_warned(make_model, caplog):
    with pytest.raises(ValueError, match="match no unit"):
        make_model(gradient_checkpointing=True, checkpoint_modules=["denoiser.up_blocks.9.motion_modules"])
    listed = [
        "denoiser.up_blocks.3.motion_modules",
        "denoiser.down_blocks.0.motion_modules",
    ]  # full-size names
    model = make_model(gradient_checkpointing=True, checkpoint_modules=listed)
    assert model.checkpointed_units == [
        "denoiser.down_blocks.0.motion_modules"
    ]  # the tiny model has 2 blocks
    assert "up_blocks.3.motion_modules" in caplog.text
    with pytest.raises(ValueError, match="expected a list"):
        MegActorConfig(checkpoint_modules="denoiser")  # a YAML string, not a list
