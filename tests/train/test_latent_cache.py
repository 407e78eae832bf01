"""Cached VAE latents in the trainer: the same latents and the same loss as the online encode, used only
where they fit, and the online encode itself in float32 under the trainer's bf16 autocast."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from shard_helpers import write_synthetic_shards

from model.loading import build_megactor
from model.megactor import MegActor
from pipeline.latents import latent_paths, load_vae, run_latents
from train.config import load_train_config
from train.data import DataConfig, fixed_batch, list_shards
from train.loop import evaluation_loss, to_model_batch

RESOLUTION = 64


@pytest.fixture(scope="module")
def model(tiny_model_weights: Path) -> MegActor:
    torch.manual_seed(0)
    return build_megactor(tiny_model_weights).eval()


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_weights: Path) -> Path:
    """Two shards of synthetic clips (every bucket) with fp32 latents cached by the pass."""
    root = tmp_path_factory.mktemp("cached")
    folder = write_synthetic_shards(root, samples=3, shards=2, frames=10, size=RESOLUTION)
    summary = run_latents([str(folder)], load_vae("tiny", str(tiny_model_weights)), torch.device("cpu"))
    assert len(summary.encoded) == 2 and not summary.failed
    return root


def config(root: Path, **changes: object) -> DataConfig:
    settings = dict(root=str(root), num_frames=3, stride=2, resolution=RESOLUTION, num_workers=0)
    return DataConfig(**{**settings, **changes})


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_encode_frames_ignores_the_callers_bf16_autocast(model: MegActor) -> None:
    frames = torch.rand(1, 2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = model.encode_frames(frames)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.encode_frames(frames)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


@pytest.mark.parametrize("reference", ["segment", "window"])
def test_cached_latents_equal_the_online_encode_of_the_same_frames(
    cached_root: Path, model: MegActor, reference: str
) -> None:
    batch = fixed_batch(config(cached_root, latents="required", reference=reference), 3)
    assert batch["target_latents"].dtype == torch.float32
    assert relative_error(batch["target_latents"], model.encode_frames(batch["target"])) < 1e-5
    online_reference = model.encode_frames(batch["reference"][:, None])[:, 0]
    assert relative_error(batch["reference_latent"], online_reference) < 1e-5
    assert batch["latent_vae"] == model.vae_fingerprint()


def test_the_loss_of_a_fixed_batch_is_the_same_cached_or_online(cached_root: Path, model: MegActor) -> None:
    cached = fixed_batch(config(cached_root, latents="required"), 1)
    online = fixed_batch(config(cached_root, latents="off"), 1)
    assert "target_latents" not in online and cached["key"] == online["key"]
    encoder_calls = []
    hook = model.vae.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        cached_loss = evaluation_loss(model, to_model_batch(cached, torch.device("cpu")), seed=3, repeats=1)
        assert not encoder_calls, "the VAE ran although the batch carried cached latents"
        online_loss = evaluation_loss(model, to_model_batch(online, torch.device("cpu")), seed=3, repeats=1)
        assert encoder_calls
    finally:
        hook.remove()
    assert cached_loss == pytest.approx(online_loss, rel=1e-5)


def test_uncached_shards_are_encoded_online_or_named_when_required(cached_root: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(cached_root, partial)
    shards = list_shards(config(partial))
    _, marker = latent_paths(shards[0])
    Path(marker).unlink()  # that shard's latents were never committed
    with pytest.raises(FileNotFoundError, match="data.latents=required") as error:
        fixed_batch(config(partial, latents="required"), 1)
    assert marker in str(error.value) and "pipeline latents" in str(error.value)
    mixed = fixed_batch(config(partial, latents="auto", batch_size=1), 3)
    assert "target_latents" not in mixed  # one sample without latents: the batch is encoded online
    other_size = fixed_batch(config(cached_root, latents="auto", resolution=32), 1)
    assert "target_latents" not in other_size  # cached at 64 px, trained at 32 px
    with pytest.raises(FileNotFoundError, match="resolution 64"):
        fixed_batch(config(cached_root, latents="required", resolution=32), 1)


def test_latents_of_another_vae_are_refused(cached_root: Path, model: MegActor) -> None:
    batch = to_model_batch(fixed_batch(config(cached_root), 1), torch.device("cpu"))
    assert batch.target is None and batch.target_latents is not None
    batch.latent_vae = "0123456789abcdef"
    with pytest.raises(ValueError, match="another VAE|computed with VAE"):
        model(batch)


def test_data_latents_takes_three_modes() -> None:
    assert load_train_config("stage1").data.latents == "auto"
    overridden = load_train_config("stage1", ["configs/train/tiny.yaml"], ["data.latents=required"])
    assert overridden.data.latents == "required"
    with pytest.raises(ValueError, match="data.latents"):
        load_train_config("stage1", overrides=["data.latents=sometimes"])
