"""Guidance rescale (Lin et al. 2023 §3.4) and the sampler's autocast choice."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from model.loading import load_megactor
from model.sampling import (
    MegActorPipeline,
    SamplingConfig,
    context_windows,
    default_guidance_rescale,
    rescale_guidance,
    tf32_matmul,
)

FAST = dict(num_inference_steps=3, context_frames=4, context_overlap=2, progress=False, eta=0.5, seed=3)


def inputs(frames: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 64, 64, generator=gen) * 2 - 1, torch.rand(frames, 3, 64, 64, generator=gen) * 2 - 1


@torch.no_grad()
def plain_guidance_sample(pipe: MegActorPipeline, reference, driving, cfg: SamplingConfig) -> torch.Tensor:
    """The sampler with plain classifier-free guidance, written out step by step (no rescale, no autocast)."""
    model, scheduler = pipe.model.eval(), pipe.scheduler
    background_mask = torch.ones_like(reference[:1])
    reference, driving = reference[None], driving[None]
    condition = model.encode_condition(reference, background_mask[None])
    windows = context_windows(driving.shape[1], cfg.context_frames, cfg.context_overlap)
    driven = torch.cat(
        [model.driven_encoder(c, None) for c in driving.split(cfg.context_frames, dim=1)], dim=1
    )
    condition = type(condition)(*(x.repeat(2, *([1] * (x.ndim - 1))) for x in vars(condition).values()))
    keep = torch.tensor([False, True])
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    shape = (1, driven.shape[1], *condition.reference_latent.shape[1:])
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(cfg.num_inference_steps, device="cpu")
    for t in scheduler.timesteps:
        timesteps = t.expand(2)
        model.write_reference(condition, timesteps, keep)
        total, counts = torch.zeros_like(latents), torch.zeros(1, latents.shape[1], 1, 1, 1)
        for frames in windows:
            w = slice(frames.start, frames.stop)
            out = model.denoise(
                latents[:, w].expand(2, -1, -1, -1, -1),
                timesteps,
                condition,
                driven[:, w].expand(2, -1, -1, -1, -1),
            )
            uncond, cond = out.chunk(2)
            total[:, w] += uncond + cfg.guidance_scale * (cond - uncond)
            counts[:, w] += 1
        latents = scheduler.step(total / counts, t, latents, eta=cfg.eta, generator=generator).prev_sample
    model.bank.clear()
    return model.decode_latents(latents)[0]


@pytest.fixture(scope="module")
def pipe(tiny_weights) -> MegActorPipeline:
    return MegActorPipeline(load_megactor(tiny_weights))


@pytest.fixture(scope="module")
def plain(pipe) -> torch.Tensor:
    return plain_guidance_sample(pipe, *inputs(), SamplingConfig(**FAST))


def test_rescale_zero_is_plain_guidance_bit_for_bit(pipe, plain):
    video = pipe(*inputs(), config=SamplingConfig(guidance_rescale=0.0, **FAST))
    assert torch.equal(video, plain)


def test_default_rescale_follows_the_models_schedule(pipe, plain, make_model):
    assert default_guidance_rescale(pipe.model.config) == 0.7  # tiny model: v-prediction, zero terminal SNR
    assert default_guidance_rescale(make_model(prediction_type="epsilon").config) == 0.0
    assert default_guidance_rescale(make_model(rescale_betas_zero_snr=False).config) == 0.0
    default = pipe(*inputs(), config=SamplingConfig(**FAST))
    explicit = pipe(*inputs(), config=SamplingConfig(guidance_rescale=0.7, **FAST))
    assert torch.equal(default, explicit) and torch.isfinite(default).all()
    assert not torch.equal(default, plain)


def test_rescale_matches_a_hand_computation():
    cond = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])  # per-sample std 1 and 4/sqrt(3)
    guided = torch.tensor([[0.0, 2.0, 4.0], [0.0, 0.0, 2.0]])  # std 2 and 2/sqrt(3)
    # full rescale: guided * std(cond) / std(guided), i.e. x 1/2 and x 2
    torch.testing.assert_close(
        rescale_guidance(guided, cond, 1.0), torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 4.0]])
    )
    half = rescale_guidance(guided, cond, 0.5)  # halfway between rescaled and guided
    torch.testing.assert_close(half, torch.tensor([[0.0, 1.5, 3.0], [0.0, 0.0, 3.0]]))
    torch.testing.assert_close(rescale_guidance(guided, cond, 1.0).std(dim=1), cond.std(dim=1))


@pytest.mark.parametrize("rescale", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(rescale):
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 4, 4, 8, 8, generator=gen)  # a window of (branch-split) predictions
    guided = cond + 4.5 * torch.randn(2, 4, 4, 8, 8, generator=gen)
    ours = rescale_guidance(guided, cond, rescale)
    torch.testing.assert_close(ours, rescale_noise_cfg(guided, cond, guidance_rescale=rescale))
    per_sample = ours.flatten(1).std(dim=1)  # each sample matched on its own, not the batch
    expected = rescale * cond.flatten(1).std(dim=1) + (1 - rescale) * guided.flatten(1).std(dim=1)
    torch.testing.assert_close(per_sample, expected)


def denoiser_dtypes(pipe: MegActorPipeline) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen: list = []
    handle = pipe.model.denoiser.register_forward_hook(lambda _m, _a, out: seen.append(out.sample.dtype))
    return seen, handle


def test_auto_on_cpu_runs_float32_as_before(pipe, plain):
    seen, handle = denoiser_dtypes(pipe)
    try:
        video = pipe(*inputs(), config=SamplingConfig(autocast="auto", guidance_rescale=0.0, **FAST))
    finally:
        handle.remove()
    assert set(seen) == {torch.float32}
    assert torch.equal(video, plain)


def test_bf16_autocast_runs_the_networks_in_bf16(pipe, plain):
    seen, handle = denoiser_dtypes(pipe)
    try:
        video = pipe(*inputs(), config=SamplingConfig(autocast="bf16", guidance_rescale=0.0, **FAST))
    finally:
        handle.remove()
    assert set(seen) == {torch.bfloat16}
    assert video.dtype == torch.float32 and video.shape == plain.shape and torch.isfinite(video).all()
    assert not torch.equal(video, plain)


def test_off_overrides_the_callers_autocast(pipe, plain):
    seen, handle = denoiser_dtypes(pipe)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            video = pipe(*inputs(), config=SamplingConfig(autocast="off", guidance_rescale=0.0, **FAST))
    finally:
        handle.remove()
    assert set(seen) == {torch.float32}
    assert torch.equal(video, plain)


def test_tf32_flags_are_restored_after_the_call():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with tf32_matmul(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bad_settings_say_what_is_expected():
    with pytest.raises(ValueError, match="autocast: expected one of"):
        SamplingConfig(autocast="fp16")
    with pytest.raises(ValueError, match=r"guidance_rescale: expected a value in \[0, 1\]"):
        SamplingConfig(guidance_rescale=1.5)
