import pytest
import torch
from diffusers import UNet2DConditionModel, UNetMotionModel
from model_helpers import FRAMES, perturb_

from model.components import PROFILES, load_components
from model.reference_attention import ReferenceBank, install_reference_attention, select_reference_layers


def denoiser_inputs(model, batch_size=2, seed=0):
    """Random 13-channel input (B, F, 13, h, w), timesteps and CLIP-sized tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(
        batch_size, model.background.num_tokens, model.reference_net.config.cross_attention_dim, generator=gen
    )
    latents = torch.randn(batch_size, FRAMES, 13, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 700])[:batch_size]
    reference = torch.randn(batch_size, 4, 8, 8, generator=gen)
    return latents, timesteps, tokens, reference


def run_denoiser(model, latents, timesteps, tokens):
    context = tokens.repeat_interleave(latents.shape[1], dim=0)  # (B*F, T, D)
    return model.denoiser(latents.transpose(1, 2), timesteps, context).sample.transpose(1, 2)


def plain_motion_unet(tiny_weights):
    """The unmodified diffusers UNetMotionModel (4 input channels) from the same components."""
    components = load_components(tiny_weights)
    return UNetMotionModel.from_unet2d(components.unet, components.motion_adapter)


def test_widened_denoiser_at_init_equals_the_plain_unet_on_the_noisy_latent(make_model, tiny_weights):
    model = make_model()
    plain = plain_motion_unet(tiny_weights)
    weight = model.denoiser.conv_in.weight
    assert weight.shape[1] == 13
    torch.testing.assert_close(weight[:, :4], plain.conv_in.weight, rtol=0, atol=0)
    assert torch.count_nonzero(weight[:, 4:]) == 0
    latents, timesteps, tokens, _ = denoiser_inputs(model)
    model.bank.enabled = False
    with torch.no_grad():
        ours = run_denoiser(model, latents, timesteps, tokens)  # channels 4..12 are random, and ignored
        theirs = plain(
            latents[:, :, :4].transpose(1, 2), timesteps, tokens.repeat_interleave(FRAMES, 0)
        ).sample
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_reference_attention_changes_the_output_and_off_equals_plain(make_model, tiny_weights):
    model = make_model()
    plain = plain_motion_unet(tiny_weights)
    latents, timesteps, tokens, reference = denoiser_inputs(model)
    latents[:, :, 4:] = 0  # only the noisy latent, so the plain 4-channel UNet sees the same input
    with torch.no_grad():
        model.bank.clear()
        model.bank.keep = torch.tensor([True, True])
        model.reference_net(reference, timesteps, tokens)
        assert sorted(model.bank.tokens) == sorted(model.reference_layers)
        with_reference = run_denoiser(model, latents, timesteps, tokens)
        model.bank.enabled = False
        without = run_denoiser(model, latents, timesteps, tokens)
        baseline = plain(
            latents[:, :, :4].transpose(1, 2), timesteps, tokens.repeat_interleave(FRAMES, 0)
        ).sample
    torch.testing.assert_close(without, baseline.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert (with_reference - without).abs().mean() > 1e-3


def test_dropped_samples_see_no_reference(make_model):
    model = make_model()
    latents, timesteps, tokens, reference = denoiser_inputs(model)
    with torch.no_grad():
        model.bank.clear()
        model.reference_net(reference, timesteps, tokens)
        model.bank.keep = torch.tensor([True, False])
        mixed = run_denoiser(model, latents, timesteps, tokens)
        model.bank.keep = None
        full = run_denoiser(model, latents, timesteps, tokens)
        model.bank.enabled = False
        none = run_denoiser(model, latents, timesteps, tokens)
    torch.testing.assert_close(mixed[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], none[1], rtol=1e-5, atol=1e-5)


def test_block_selection(make_model):
    model = make_model(reference_blocks="full")
    midup = select_reference_layers(model.denoiser, "midup")
    assert midup and all(n.startswith(("mid_block.", "up_blocks.")) for n in midup)
    assert set(model.reference_layers) > set(midup)
    assert any(n.startswith("down_blocks.") for n in model.reference_layers)
    assert not any("motion_modules" in n for n in model.reference_layers)


def test_mismatched_blocks_name_both_sides(make_model):
    model = make_model()
    spec = dict(PROFILES["tiny"]["unet"])
    spec.update(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    other = UNet2DConditionModel(**spec)
    with pytest.raises(ValueError) as error:
        install_reference_attention(other, model.denoiser, "midup", ReferenceBank())
    message = str(error.value)
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor" in message  # denoiser side
    assert "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor" in message  # ReferenceNet side


def test_reference_tokens_must_fit(make_model):
    model = make_model()
    perturb_(model.denoiser)
    latents, timesteps, tokens, _ = denoiser_inputs(model)
    name = model.reference_layers[0]
    model.bank.tokens = {name: torch.randn(2, 64, 7)}
    with pytest.raises(ValueError, match="do not match reference tokens"):
        run_denoiser(model, latents, timesteps, tokens)
