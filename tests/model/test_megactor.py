import pytest
import torch
import torch.nn.functional as F
from model_helpers import FRAMES, make_batch, perturb_

TRAINABLE_PREFIXES = ("reference_net.", "denoiser.", "driven_encoder.")


def train_step(model, batch, seed=0):
    out = model(batch, generator=torch.Generator().manual_seed(seed))
    loss = F.mse_loss(out.prediction, out.target)
    loss.backward()
    return out, loss


def test_forward_returns_the_loss_inputs(make_model):
    model = make_model(reference_dropout=0.0)
    out = model(make_batch(), generator=torch.Generator().manual_seed(0))
    assert out.prediction.shape == out.target.shape == (2, FRAMES, 4, 8, 8)
    assert out.timesteps.shape == (2,) and out.timesteps.dtype == torch.int64
    assert out.reference_kept.all()
    assert torch.isfinite(out.prediction).all()


def test_target_latents_skip_the_vae_and_match_encoding(make_model):
    model = make_model()
    batch = make_batch()
    latents = model.encode_frames(batch.target)
    a = model(batch, generator=torch.Generator().manual_seed(3))
    batch.target, batch.target_latents = None, latents
    b = model(batch, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.prediction, b.prediction, rtol=0, atol=0)


def test_v_prediction_target_is_the_velocity(make_model):
    model = make_model(prediction_type="v_prediction", noise_offset=0.0)
    batch = make_batch()
    out = model(batch, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(out.target.shape, generator=gen)
    latents = model.encode_frames(batch.target)
    expected = model.scheduler.get_velocity(latents, noise, out.timesteps)
    torch.testing.assert_close(out.target, expected)


def test_reference_dropout_only_while_training(make_model):
    model = make_model(reference_dropout=1.0)
    assert not model.train()(make_batch()).reference_kept.any()
    assert model.eval()(make_batch()).reference_kept.all()
    assert not model.vae.training and not model.background.training


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gradients_reach_exactly_the_trainable_set(make_model, stage):
    model = make_model(reference_dropout=0.0)
    perturb_(model)  # zero-initialised layers would otherwise block gradients upstream
    trainable = model.trainable_parameters(stage)
    train_step(model.train(), make_batch())
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got == set(trainable)
    if stage == "stage1":
        assert all(any(n.startswith(p) for n in got) for p in TRAINABLE_PREFIXES)
        assert not any(n.startswith(("vae.", "background.")) for n in got)
    else:
        assert all("motion_modules" in n and n.startswith("denoiser.") for n in got)
    for prefix in {n.split(".")[0] for n in got}:
        norm = sum(
            p.grad.norm() for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None
        )
        assert norm > 0, prefix


def test_unused_reference_parameters_are_exactly_those_without_gradient(make_model):
    model = make_model(reference_dropout=0.0)
    perturb_(model)
    model.requires_grad_(False)
    model.reference_net.requires_grad_(True)
    train_step(model.train(), make_batch())
    no_grad = {n for n, p in model.named_parameters() if n.startswith("reference_net.") and p.grad is None}
    assert no_grad == set(model.unused_parameter_names())


def test_trainable_patterns_are_checked(make_model):
    with pytest.raises(ValueError, match="stage"):
        make_model().trainable_parameters("stage3")
    with pytest.raises(ValueError, match="'nothing.*'"):
        make_model(trainable={"s": ["nothing.*"]}).trainable_parameters("s")
    with pytest.raises(ValueError, match="frozen"):
        make_model(trainable={"s": ["*"]}).trainable_parameters("s")


def test_gradient_checkpointing_gives_the_same_gradients(make_model):
    grads = []
    for checkpointing in (False, True):
        model = make_model(reference_dropout=0.0, gradient_checkpointing=checkpointing)
        flags = [
            m.gradient_checkpointing for m in model.denoiser.modules() if hasattr(m, "gradient_checkpointing")
        ]
        assert any(flags) == all(flags) == checkpointing
        perturb_(model)
        params = model.trainable_parameters("stage1")
        _, loss = train_step(model.train(), make_batch())
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in params.values()])))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
