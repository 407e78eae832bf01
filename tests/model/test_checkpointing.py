"""Gradient checkpointing reaches the AnimateDiff motion modules, saves less and keeps the gradients."""

import torch
import torch.nn.functional as F
from model_helpers import make_batch, perturb_

from model.checkpointing import CheckpointedMotionModule, SavedActivations, motion_modules


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
