"""Under bf16 autocast only the networks run in bf16: noising, targets, prediction and DDIM stay float32."""

import contextlib

import pytest
import torch
from model_helpers import make_batch

from model.loading import load_megactor
from model.sampling import MegActorPipeline, SamplingConfig

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def capture_noisy(model) -> dict:
    """The noisy latents the denoiser receives: channels 0-3 of its (B, 13, F, h, w) input."""
    seen: dict = {}

    def hook(_module, args):
        seen["noisy"] = args[0][:, :4].transpose(1, 2).detach()  # (B, F, 4, h, w)

    model.denoiser.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("fixed", [None, [0, 1, 2, 9]], ids=["drawn", "t=0,1,2,9"])
def test_noise_is_added_in_float32_under_bf16_autocast(make_model, fixed):
    model = make_model(prediction_type="epsilon", noise_offset=0.0, reference_dropout=0.0)
    batch = make_batch(batch_size=4)
    seen = capture_noisy(model)
    kwargs = {} if fixed is None else {"timesteps": torch.tensor(fixed)}
    with torch.no_grad(), torch.autocast(**BF16):
        clean = model.encode_frames(batch.target)  # the VAE runs in bf16, its latents come back fp32
        out = model(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    assert clean.dtype == out.target.dtype == out.prediction.dtype == torch.float32
    noise = out.target.double()  # epsilon target, no offset: the noise itself
    assert (noise.to(torch.bfloat16).double() != noise).float().mean() > 0.9  # drawn in fp32, not bf16
    abar = model.scheduler.alphas_cumprod.double()[out.timesteps].view(-1, 1, 1, 1, 1)
    expected = abar.sqrt() * clean.double() + (1 - abar).sqrt() * noise  # fp64 reference
    torch.testing.assert_close(seen["noisy"].double(), expected, rtol=1e-6, atol=2e-6)
    if fixed is not None:  # at t = 0 and 1 the noise level is sqrt(1 - abar) ~ 0.03, not 0 (bf16 rounds it)
        residual = seen["noisy"].double() - abar.sqrt() * clean.double()
        level = (residual * noise).sum(dim=(1, 2, 3, 4)) / (noise * noise).sum(dim=(1, 2, 3, 4))  # (B,)
        torch.testing.assert_close(level, (1 - abar.flatten()).sqrt(), rtol=1e-5, atol=0)


def test_velocity_target_is_float32_under_bf16_autocast(make_model):
    model = make_model(prediction_type="v_prediction", noise_offset=0.0, reference_dropout=0.0)
    batch = make_batch(batch_size=2)
    seen = capture_noisy(model)
    with torch.no_grad(), torch.autocast(**BF16):
        clean = model.encode_frames(batch.target).double()
        out = model(batch, generator=torch.Generator().manual_seed(1), timesteps=torch.tensor([0, 500]))
    abar = model.scheduler.alphas_cumprod.double()[out.timesteps].view(-1, 1, 1, 1, 1)
    noise = (seen["noisy"].double() - abar.sqrt() * clean) / (1 - abar).sqrt()
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * clean
    assert out.target.dtype == torch.float32
    torch.testing.assert_close(out.target.double(), velocity, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16 weights", "bf16 autocast"])
def test_ddim_arithmetic_stays_float32(tiny_weights, precision):
    model = load_megactor(tiny_weights)
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    pipe = MegActorPipeline(model)
    dtypes = []
    step, denoise = pipe.scheduler.step, model.denoise

    def spy_step(model_output, timestep, sample, **kwargs):
        out = step(model_output, timestep, sample, **kwargs)
        dtypes.append((model_output.dtype, sample.dtype, out.prev_sample.dtype))
        return out

    def spy_denoise(*args):  # what classifier-free guidance combines
        out = denoise(*args)
        dtypes.append((out.dtype,))
        return out

    pipe.scheduler.step, model.denoise = spy_step, spy_denoise
    gen = torch.Generator().manual_seed(0)
    reference, driving = (
        torch.rand(3, 64, 64, generator=gen) * 2 - 1,
        torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1,
    )
    config = SamplingConfig(
        num_inference_steps=2,
        guidance_scale=3.0,
        eta=0.5,
        context_frames=4,
        context_overlap=0,
        progress=False,
    )
    with torch.autocast(**BF16) if precision == "bf16 autocast" else contextlib.nullcontext():
        video = pipe(reference, driving, config=config)
    assert video.shape == (4, 3, 64, 64) and torch.isfinite(video).all()
    assert len(dtypes) == 4  # 2 steps x (one denoise + one DDIM step)
    assert all(d == torch.float32 for entry in dtypes for d in entry), dtypes
