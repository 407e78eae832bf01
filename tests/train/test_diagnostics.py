"""Conditioning diagnostics: a dead driving or reference path reads gain 0 and fails the learning check;
the zero-initialised conditioning weights move when trained; swap samples pair with their own real.mp4."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from shard_helpers import _row, write_synthetic_shards

from model.loading import build_megactor
from model.preprocess import grayscale3, to_model_pixels
from pipeline import contract
from pipeline.video import EncodeSettings, read_video_frames
from pipeline.writer import encode_members, write_shard
from train.augment import black_outside
from train.data import DataConfig, fixed_batch, list_shards
from train.diagnostics import ABLATIONS, REAL_DRIVING, DiagnosticsSettings, batch_losses, diagnostic_batch
from train.learning_check import (
    DRIVING_GAIN,
    REFERENCE_GAIN,
    check_config,
    cut_paths,
    main,
    train,
    unit_variance_scale,
    verdict,
)

CPU = torch.device("cpu")
STEPS = 3
SETTINGS = DiagnosticsSettings(seed=0, repeats=1, t_min=300, t_max=900)
NO_JITTER = ["data.scale_jitter=[1.0,1.0]", "data.aspect_jitter=[1.0,1.0]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag_shards")
    write_synthetic_shards(out, samples=4, shards=1, frames=24, size=64, buckets=("swap", "real"))
    return out


def run(weights: Path, shards: Path, cuts: tuple[str, ...]) -> dict:
    """Diagnostics of the tiny model before and after STEPS training steps with `cuts` dead, and the
    conditioning weights before and after."""
    config = check_config(shards, STEPS, NO_JITTER)
    torch.manual_seed(0)
    model = build_megactor(weights, config.megactor_config())
    batch = diagnostic_batch(config.data, 2, seed=0)
    start = {k: v.detach().clone() for k, v in watched(model).items()}
    with cut_paths(model, cuts):
        initial = batch_losses(model, batch, SETTINGS, CPU)
        train(model, config, STEPS)
        trained = batch_losses(model, batch, SETTINGS, CPU)
    moved = {k: float((v.detach() - start[k]).abs().max()) for k, v in watched(model).items()}
    return {"initial": initial, "trained": trained, "moved": moved}


def watched(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """conv_in's zero-initialised reference / mask / driving channels (4:13) and the DrivenEncoder's output."""
    return {
        "conv_in_extra": model.denoiser.conv_in.weight[:, 4:],
        "driven_encoder_out": model.driven_encoder.out.weight,
    }


@pytest.fixture(scope="module")
def healthy(tiny_model_weights: Path, shards: Path) -> dict:
    return run(tiny_model_weights, shards, ())


@pytest.mark.slow
def test_untrained_model_ignores_the_driving_video(healthy: dict) -> None:
    # conv_in's driving channels start at zero: nothing the DrivenEncoder outputs reaches the prediction
    assert healthy["initial"][DRIVING_GAIN] == 0.0
    assert healthy["initial"]["gain_driving_blank"] == 0.0


@pytest.mark.slow
def test_training_moves_the_zero_initialised_channels_and_the_driven_encoder(healthy: dict) -> None:
    assert healthy["moved"]["conv_in_extra"] > 1e-4, healthy["moved"]
    assert healthy["moved"]["driven_encoder_out"] > 1e-4, healthy["moved"]
    # once those channels are non-zero, swapping the driving frames changes the loss
    assert abs(healthy["trained"][DRIVING_GAIN]) > 1e-6, healthy["trained"]


@pytest.mark.slow
@pytest.mark.parametrize(("cut", "gain"), [("driving", DRIVING_GAIN), ("reference", REFERENCE_GAIN)])
def test_a_dead_condition_path_reads_zero_gain_and_fails_the_check(
    tiny_model_weights: Path, shards: Path, healthy: dict, cut: str, gain: str
) -> None:
    result = run(tiny_model_weights, shards, (cut,))
    assert abs(result["trained"][gain]) < 1e-9, result["trained"]
    if cut == "reference":  # reference attention is part of the cut: the unconditional branch is the same
        assert result["trained"]["gain_reference_dropped"] == 0.0, result["trained"]
    assert abs(healthy["trained"][gain]) > 1e-6, healthy["trained"]  # the same training with it alive
    problems = verdict({"gains": result["initial"]}, {"gains": result["trained"]})
    assert any(gain in p and p.startswith("trained") for p in problems), problems


def test_the_diagnostic_batch_takes_one_segment_per_clip(tmp_path: Path) -> None:
    # two segments of clip00 then clip01: swapping a condition between the first two would swap a clip
    # with itself
    rows = []
    for index, segment in [(0, 0), (0, 1), (1, 0)]:
        row = _row(index, "real", 24, 64)
        row.update(key=contract.sample_key("synthetic", f"clip{index:02d}", segment), segment=segment)
        rows.append(encode_members(row, 64, EncodeSettings()))
    (tmp_path / "shards").mkdir()
    write_shard(rows, tmp_path / "shards")
    batch = diagnostic_batch(DataConfig(root=str(tmp_path), num_frames=4, resolution=64), 3)
    assert batch["key"] == [rows[0]["key"], rows[2]["key"]]


def masked_gray(frames: np.ndarray, face: np.ndarray, indices: list[int]) -> torch.Tensor:
    """The documented driving input without jitter: the face-masked grayscale frames at `indices`."""
    return to_model_pixels(grayscale3(black_outside(frames[indices], face[indices])))


def test_swap_samples_carry_their_real_driving_frames(shards: Path) -> None:
    data = DataConfig(root=str(shards), num_frames=4, stride=2, resolution=64, scale_jitter=[1.0, 1.0],
                      aspect_jitter=[1.0, 1.0])  # fmt: skip
    batch = diagnostic_batch(data, 4, seed=3)
    raws = {s["__key__"]: s for url in list_shards(data) for s in wds.WebDataset(url, shardshuffle=False)}
    assert sorted(batch["bucket"]) == ["real", "real", "swap", "swap"]
    for i, key in enumerate(batch["key"]):
        raw, indices = raws[key], batch["frame_indices"][i].tolist()
        face = contract.decode_mask(raw[contract.FACE_MASK])
        real = masked_gray(read_video_frames(raw[contract.REAL]), face, indices)
        own = contract.VIDEO_MEMBER_OF_BUCKET[batch["bucket"][i]]
        assert torch.equal(batch["driving"][i], masked_gray(read_video_frames(raw[own]), face, indices))
        assert torch.equal(batch[REAL_DRIVING][i], real), key
        if batch["bucket"][i] == "swap":
            assert not torch.equal(batch["driving"][i], real)  # the pair differs: a gap can show


@pytest.mark.slow
def test_swap_gap_is_measured_on_the_swap_samples_of_the_batch(healthy: dict) -> None:
    for losses in (healthy["initial"], healthy["trained"]):  # the batch: one swap and one real clip
        assert losses["swap_samples"] == 1
        assert losses["swap_gap"] == pytest.approx(losses["loss_swap_driving"] - losses["loss_real_driving"])
    # untrained, the driving channels are zero: which driving video it gets makes no difference
    assert healthy["initial"]["swap_gap"] == 0.0


def test_ablations_change_only_their_condition() -> None:
    from model.megactor import MegActorBatch
    from train.diagnostics import ablated_batch

    batch = MegActorBatch(
        reference=torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2),
        driving=torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 2, 3, 2, 2),
        background_mask=torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2),
        target=torch.zeros(3, 2, 3, 2, 2),
    )
    shuffled = ablated_batch(batch, "driving_shuffled")
    assert [float(shuffled.driving[i].mean()) for i in range(3)] == [2.0, 0.0, 1.0]  # every sample differs
    assert shuffled.reference is batch.reference and shuffled.background_mask is batch.background_mask
    assert (ablated_batch(batch, "driving_blank").driving == -1).all()
    reference = ablated_batch(batch, "reference_shuffled")
    assert torch.equal(reference.reference[0], batch.reference[2]) and reference.driving is batch.driving
    assert torch.equal(reference.background_mask[0], batch.background_mask[2])  # the mask goes with its frame
    background = ablated_batch(batch, "background_shuffled")
    assert background.reference is batch.reference and torch.equal(
        background.background_mask[1], batch.background_mask[0]
    )
    dropped = ablated_batch(batch, "reference_dropped")  # reference attention off: no input changes
    assert all(getattr(dropped, f.name) is getattr(batch, f.name) for f in dataclasses.fields(batch))


def test_diagnose_cli_reads_a_training_checkpoints_exported_model(
    tiny_model_weights: Path, shards: Path, tmp_path: Path
) -> None:
    import json

    from model.loading import save_checkpoint
    from train.diagnose import RESULT_FILE, main

    checkpoint = tmp_path / "checkpoint_000001"
    save_checkpoint(build_megactor(tiny_model_weights), checkpoint / "model")  # only model/ is read
    out = tmp_path / "diag"
    args = ["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "train", "--out", str(out),
            "--weights-dir", str(tiny_model_weights), "--samples", "2", "validation.loss_repeats=1",
            "data.num_frames=4", "data.resolution=64"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / RESULT_FILE).read_text())
    assert set(result["gains"]) == {f"gain_{a}" for a in ABLATIONS}
    assert len(result["keys"]) == 2 and all(result["keys"])
    assert result["timestep_range"] == [100, 900] and result["seed"] == 0 and result["split"] == "train"
    assert result["losses"]["swap_samples"] == 1 and "swap_gap" in result["losses"]


def test_the_learning_check_without_its_shards_says_how_to_build_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "make learning-check" in capsys.readouterr().out


def test_the_checks_latent_scale_gives_unit_variance_latents(tiny_model_weights: Path, shards: Path) -> None:
    config = check_config(shards, STEPS, NO_JITTER)
    model = build_megactor(tiny_model_weights, config.megactor_config())
    sd_scale = model.latent_scale
    model.latent_scale = unit_variance_scale(model, config.data, 4)
    latents = model.encode_frames(fixed_batch(config.data, 4, allow_fewer=True)["target"])
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-4)
    assert model.latent_scale > 5 * sd_scale  # the tiny VAE's latents are far smaller than SD's
