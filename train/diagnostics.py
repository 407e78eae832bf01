"""Conditioning diagnostics: does the model use the driving video, the reference and the background?

On a fixed held-out batch with fixed noise and fixed timesteps, the denoising loss is measured with every
condition intact and with one condition taken away or swapped between the samples of the batch:

    loss                      every condition intact
    loss_driving_shuffled     each sample gets the next sample's driving frames (rolled across the batch)
    loss_driving_blank        the driving frames are blank (-1: what the face mask leaves outside the face)
    loss_reference_shuffled   each sample gets the next sample's reference image (and its background mask)
    loss_reference_dropped    reference attention off: the unconditional branch classifier-free guidance uses
    loss_background_shuffled  each sample gets the next sample's background mask (mask channel + CLIP tokens)

gain_<ablation> = (loss_<ablation> - loss) / loss: about 0 when the model ignores that condition, clearly
positive when it relies on it. swap_gap (swap-bucket samples only): the loss with the sample's swap
driving video minus the loss with its real driving video (the same frames of real.mp4, same face mask and
jitter); a model that takes appearance from the driving video does worse on the swap video (gap > 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds
from torch import nn

from model.megactor import MegActor, MegActorBatch
from pipeline import contract
from train.config import TrainConfig
from train.data import DataConfig, SampleSkipped, StreamStats, TarSamples, collate, decode_sample, list_shards
from train.loop import autocast, step_generator, to_model_batch, unwrap

ABLATIONS = (
    "driving_shuffled",
    "driving_blank",
    "reference_shuffled",
    "reference_dropped",
    "background_shuffled",
)
REAL_DRIVING = "driving_real"  # batch key: each sample's real driving frames (== driving unless swap)


@dataclass
class DiagnosticsSettings:
    """Fixed noise draws (`repeats`, seeded) and timesteps spread evenly over [t_min, t_max]."""

    seed: int = 0
    repeats: int = 4
    t_min: int = 100
    t_max: int = 900
    mixed_precision: str = "fp32"


def settings_of(config: TrainConfig) -> DiagnosticsSettings:
    """The validation section's diagnostics settings (seed, noise draws, timestep range, precision)."""
    section = config.validation
    return DiagnosticsSettings(
        seed=section.seed,
        repeats=section.loss_repeats,
        t_min=section.cond_t_min,
        t_max=section.cond_t_max,
        mixed_precision=config.mixed_precision,
    )


def roll(x: torch.Tensor) -> torch.Tensor:
    """Sample i gets sample i+1's tensor (a batch of one is left as is: nothing to swap with)."""
    return torch.roll(x, shifts=1, dims=0)


def ablated_batch(batch: MegActorBatch, ablation: str) -> MegActorBatch:
    """The batch with one condition swapped or removed (reference_dropped changes no input)."""
    if ablation == "driving_shuffled":
        return dataclasses.replace(batch, driving=roll(batch.driving))
    if ablation == "driving_blank":
        return dataclasses.replace(batch, driving=torch.full_like(batch.driving, -1.0))
    if ablation == "reference_shuffled":
        return dataclasses.replace(
            batch, reference=roll(batch.reference), background_mask=roll(batch.background_mask)
        )
    if ablation == "background_shuffled":
        return dataclasses.replace(batch, background_mask=roll(batch.background_mask))
    if ablation == "reference_dropped":
        return batch
    raise ValueError(f"ablation: expected one of {ABLATIONS}, got {ablation!r}")


@contextlib.contextmanager
def reference_attention_off(model: MegActor) -> Iterator[None]:
    """The unconditional branch: every denoiser sample attends to its own tokens only (the same result as
    keep=False in the bank, which sampling's guidance and reference dropout use)."""
    was = model.bank.enabled
    model.bank.enabled = False
    try:
        yield
    finally:
        model.bank.enabled = was


def fixed_timesteps(settings: DiagnosticsSettings, repeat: int, batch_size: int) -> torch.Tensor:
    """(B,) timesteps of one repeat; over all repeats they cover [t_min, t_max] evenly (stratified)."""
    slots = settings.repeats * batch_size
    index = torch.arange(batch_size) * settings.repeats + repeat  # each sample sees the whole range
    fraction = (index.double() + 0.5) / slots
    return (settings.t_min + fraction * (settings.t_max - settings.t_min)).round().long()


@torch.no_grad()
def per_sample_loss(model: nn.Module, batch: MegActorBatch, settings: DiagnosticsSettings) -> torch.Tensor:
    """(B,) plain MSE per sample, averaged over the fixed noise draws; eval mode (no reference dropout)."""
    megactor = unwrap(model)
    device = batch.reference.device
    batch_size = batch.reference.shape[0]
    total = torch.zeros(batch_size, dtype=torch.float64)
    for repeat in range(settings.repeats):
        generator = step_generator(settings.seed, 0, repeat, device)
        timesteps = fixed_timesteps(settings, repeat, batch_size).to(device)
        with autocast(device, settings.mixed_precision):
            output = megactor(batch, generator, timesteps)
        error = F.mse_loss(output.prediction.float(), output.target.float(), reduction="none")
        total += error.mean(dim=tuple(range(1, error.ndim))).double().cpu()
    return total / settings.repeats


def conditioning_losses(
    model: nn.Module,
    batch: MegActorBatch,
    settings: DiagnosticsSettings,
    real_driving: torch.Tensor | None = None,
    swap: list[bool] | None = None,
) -> dict[str, float]:
    """loss, loss_<ablation>, gain_<ablation> and, when the batch holds swap samples with their real
    driving frames, loss_swap_driving, loss_real_driving and swap_gap over those samples."""
    megactor = unwrap(model)
    was_training = megactor.training
    megactor.eval()
    try:
        intact = per_sample_loss(model, batch, settings)
        result = {"loss": float(intact.mean())}
        for ablation in ABLATIONS:
            off = (
                reference_attention_off(megactor)
                if ablation == "reference_dropped"
                else contextlib.nullcontext()
            )
            with off:
                loss = float(per_sample_loss(model, ablated_batch(batch, ablation), settings).mean())
            result[f"loss_{ablation}"] = loss
            result[f"gain_{ablation}"] = (loss - result["loss"]) / result["loss"]
        if real_driving is not None and swap is not None and any(swap):
            result.update(_swap_gap(model, batch, settings, real_driving, swap, intact))
    finally:
        megactor.train(was_training)
    return result


def _swap_gap(
    model: nn.Module,
    batch: MegActorBatch,
    settings: DiagnosticsSettings,
    real_driving: torch.Tensor,
    swap: list[bool],
    intact: torch.Tensor,
) -> dict[str, float]:
    selected = torch.tensor(swap)
    with_real = per_sample_loss(
        model, dataclasses.replace(batch, driving=real_driving.to(batch.driving.device)), settings
    )
    swap_loss, real_loss = float(intact[selected].mean()), float(with_real[selected].mean())
    return {
        "loss_swap_driving": swap_loss,
        "loss_real_driving": real_loss,
        "swap_gap": swap_loss - real_loss,
        "swap_samples": int(selected.sum()),
    }


# --- the held-out batch --------------------------------------------------------------------------------
def _as_real(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw sample with its json's bucket set to real: decode_sample then takes real.mp4 as driving."""
    meta = json.loads(raw[contract.META])
    return {**raw, contract.META: json.dumps({**meta, "bucket": "real"}).encode()}


def _clip_of(raw: dict[str, Any]) -> str | None:
    try:
        return str(json.loads(raw[contract.META])["clip_id"])
    except (KeyError, TypeError, ValueError):
        return None  # decode_sample reports what is wrong with it


def diagnostic_batch(config: DataConfig, count: int, seed: int = 0) -> dict[str, Any]:
    """The first `count` usable samples of different clips in sorted shard order (frames and jitter from
    Random(seed), as train.data.fixed_batch draws them): a condition swapped between two samples then
    always comes from another clip, never from the other segment of the same one. Plus "driving_real"
    (B, F, 3, H, W): for a swap sample its real.mp4 frames decoded with the same random state (same
    indices, reference, face mask and jitter), for any other sample its own driving frames. Fewer samples
    when the shards hold fewer clips (at least one)."""
    rng = random.Random(seed)
    stats = StreamStats(rank=0, log_every=config.log_every)
    samples: list[dict[str, Any]] = []
    real: list[torch.Tensor] = []
    clips: set[str] = set()
    for raw in wds.DataPipeline(wds.SimpleShardList(list_shards(config)), TarSamples(stats.tar_error)):
        clip = _clip_of(raw)
        if clip is not None and clip in clips:
            continue
        stats.count("samples")
        state = rng.getstate()
        try:
            sample = decode_sample(raw, config, rng)
        except SampleSkipped as exc:
            stats.failed(exc.reason, f"{raw.get('__url__')}: {exc}")
            continue
        except Exception as exc:  # the same samples count as broken here as in fixed_batch
            stats.failed("bad_samples", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
            continue
        stats.succeeded()
        if sample["bucket"] == "swap":
            twin = random.Random()
            twin.setstate(state)
            real.append(decode_sample(_as_real(raw), config, twin)["driving"])
        else:
            real.append(sample["driving"])
        samples.append(sample)
        if clip is not None:
            clips.add(clip)
        if len(samples) == count:
            break
    if not samples:
        raise ValueError(
            f"diagnostic batch: no usable samples in {config.shards or config.root} ({config.split})"
        )
    batch = collate(samples, stats.take())
    batch[REAL_DRIVING] = torch.stack(real)
    return batch


def batch_losses(
    model: nn.Module,
    batch: dict[str, Any],
    settings: DiagnosticsSettings,
    device: torch.device,
) -> dict[str, float]:
    """conditioning_losses of a diagnostic_batch (a loader batch dict)."""
    swap = [bucket == "swap" for bucket in batch.get("bucket", [])]
    real = batch.get(REAL_DRIVING)
    return conditioning_losses(model, to_model_batch(batch, device), settings, real, swap or None)


def tensorboard_scalars(losses: dict[str, float]) -> dict[str, float]:
    """val/cond/<name> for every loss, gain and the swap gap (not the sample count)."""
    return {f"val/cond/{k}": v for k, v in losses.items() if k != "swap_samples"}
