import json

import pytest
import torch
from model_helpers import perturb_

from model.components import REQUIRED_FILES, build_components, check_weights_dir
from model.config import MegActorConfig
from model.loading import CHECKPOINT_DIR, load_checkpoint, load_megactor, save_checkpoint
from model.megactor import MegActor, count

# Public parameter counts of the real checkpoints.
SD15_UNET = 859_520_964
SD_VAE = 83_653_863
CLIP_VIT_L14_VISION_WITH_PROJECTION = 303_966_208


def test_tiny_weights_are_written_in_the_real_formats(tiny_weights):
    for component, files in REQUIRED_FILES.items():
        for file in files:
            assert (tiny_weights / component / file).is_file()
    assert (
        json.loads((tiny_weights / "unet" / "config.json").read_text())["_class_name"]
        == "UNet2DConditionModel"
    )
    assert json.loads((tiny_weights / "image_encoder" / "config.json").read_text())["architectures"] == [
        "CLIPVisionModelWithProjection"
    ]
    assert (tiny_weights / CHECKPOINT_DIR / "model.safetensors").is_file()


def test_missing_files_are_named_in_one_error(tmp_path, tiny_weights):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        check_weights_dir(tmp_path)
    message = str(error.value)
    assert "has 7 problem(s)" in message and message.count(": missing") == 7
    assert (
        "vae/diffusion_pytorch_model.safetensors" in message and "image_encoder/model.safetensors" in message
    )
    assert "vae/config.json" not in message
    check_weights_dir(tiny_weights)


def test_the_trainer_refuses_files_whose_hash_is_wrong(tiny_weights):
    """Random tiny files in place of the real ones (a truncated or tampered download): every component
    with a published size / sha256 is named, with what the manifest expected, in one error (the derived
    image encoder and the AnimateDiff weights have no published hash: `weights pin` protects them)."""
    with pytest.raises(FileNotFoundError) as error:
        check_weights_dir(tiny_weights, verify_hash=True)
    message = str(error.value)
    assert "has 2 problem(s)" in message
    assert "unet/diffusion_pytorch_model.safetensors has" in message and "expected 3438167540" in message
    assert "vae/diffusion_pytorch_model.safetensors has" in message


def test_checkpoint_round_trip_is_bit_exact(make_model, tiny_weights, tmp_path):
    model = make_model(reference_blocks="full", driven_ada=True, reference_dropout=0.25)
    for module in (model.reference_net, model.denoiser, model.driven_encoder):  # what a checkpoint holds
        perturb_(module)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_megactor(tiny_weights, tmp_path / "ckpt")
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_checkpoint_that_does_not_fit_is_rejected(make_model, tmp_path):
    save_checkpoint(make_model(driven_ada=True), tmp_path)
    with pytest.raises(ValueError, match="driven_encoder.ada"):
        load_checkpoint(make_model(driven_ada=False), tmp_path)


def test_full_config_parameter_counts_on_meta(caplog):
    with torch.device("meta"):
        model = MegActor(MegActorConfig(), build_components("full"))
    counts = {
        name: count(getattr(model, name)) for name in ("reference_net", "denoiser", "vae", "background")
    }
    assert counts["reference_net"] == SD15_UNET
    assert counts["vae"] == SD_VAE
    assert counts["background"] == CLIP_VIT_L14_VISION_WITH_PROJECTION
    conv_in_extra = 9 * 320 * 3 * 3
    motion = counts["denoiser"] - SD15_UNET - conv_in_extra
    assert count(model.trainable_parameters("stage2")) == motion
    assert model.background.num_tokens == 257
    assert model.denoiser.config.in_channels == 13
