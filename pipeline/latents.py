"""Cached VAE latents: every frame of every sample's real video, encoded once, stored beside the shards.

For a shard `<folder>/<name>.tar` the cache is a sibling latent shard in `<folder>/latents/`:

    latents/<name>.tar         one member per sample, `<key>.latents.safetensors`, in the shard's order,
                               holding "latents" (num_frames, 4, R/8, R/8): the scaled posterior means
                               (what MegActor.encode_frames returns) of all the real video's frames
    latents/<name>.stats.json  the commit marker, written last: resolution, dtype, the VAE's fingerprint,
                               the keys cached and the samples left out (undecodable videos)

Committed like the shards (pipeline/writer.py): the tar is published atomically (a temp name renamed
locally, one upload on an object store), the marker after it, so a killed pass leaves no latent shard
visible and a rerun redoes only the shards without a matching marker. Every frame is cached because
the trainer may draw any window of a segment as targets and any frame of it as the reference.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import save as save_tensors

from pipeline import storage
from pipeline.contract import META, REAL, SampleMeta
from pipeline.video import IndexedVideo
from pipeline.writer import (
    STATS_SUFFIX,
    TAR_MTIME,
    atomic_write_bytes,
    committed_names,
    is_disk_full,
    read_json,
    remove_uncommitted,
    writing,
)

log = logging.getLogger(__name__)

LATENT_DIR = "latents"  # inside each shard folder
LATENT_MEMBER = "latents.safetensors"
LATENT_TENSOR = "latents"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHARD_FOLDERS = ("shards", "gaze/shards")  # the build's shard sets under OUT, where they exist


class NothingToEncode(FileNotFoundError):
    """No committed shard where the pass looked."""


def latent_folder(shards_dir: str) -> str:
    return storage.join(shards_dir, LATENT_DIR)


def latent_paths(shard: str) -> tuple[str, str]:
    """(latent tar, its marker) of the shard `<folder>/<name>.tar`."""
    name = storage.name_of(shard)[: -len(".tar")]
    folder = latent_folder(storage.parent_of(shard))
    return storage.join(folder, f"{name}.tar"), storage.join(folder, f"{name}{STATS_SUFFIX}")


def read_marker(shard: str, listed: set[str] | None = None) -> dict[str, Any] | None:
    """The latent marker of a shard; None when the shard has no committed latents. `listed`: the names
    in its latent folder, when the caller listed it once for many shards (no request per absent marker)."""
    _, marker = latent_paths(shard)
    present = storage.name_of(marker) in listed if listed is not None else storage.exists(marker)
    if not present:
        return None
    stats = read_json(marker, "delete it and rerun python -m pipeline latents")
    if not isinstance(stats, dict):
        raise ValueError(f"{marker}: a json {type(stats).__name__}, expected an object")
    return stats


def listed_latents(shards: list[str]) -> dict[str, set[str]]:
    """{shard folder: names in its latent folder}, one listing per folder."""
    folders = {storage.parent_of(shard) for shard in shards}
    return {folder: set(storage.list_names(latent_folder(folder))) for folder in folders}


@dataclass
class LatentSettings:
    """What a latent shard was computed with; a marker with other settings is recomputed."""

    vae: str  # model.megactor.vae_fingerprint of the VAE
    dtype: str = "fp32"
    resolution: int | None = None  # None: each shard's own resolution (no resize)

    def matches(self, marker: dict[str, Any]) -> bool:
        same = marker.get("vae") == self.vae and marker.get("dtype") == self.dtype
        return same and (self.resolution is None or marker.get("resolution") == self.resolution)


@dataclass
class LatentSummary:
    encoded: list[str] = field(default_factory=list)  # shards encoded by this run
    cached: list[str] = field(default_factory=list)  # shards whose latents were already there
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error
    samples: int = 0
    frames: int = 0
    bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # sample key -> why it has no latents

    def lines(self) -> list[str]:
        return [
            f"{len(self.encoded)} shards encoded, {len(self.cached)} already cached, {len(self.failed)} failed",
            f"{self.samples} samples, {self.frames} frames, {self.bytes} bytes written",
            f"{len(self.skipped)} samples left out (undecodable)",
        ]


def committed_shards(shards_dir: str) -> list[str]:
    return [storage.join(shards_dir, f"{name}.tar") for name in sorted(committed_names(shards_dir))]


def remove_uncommitted_latents(shards_dir: str) -> list[str]:
    """Temp files and latent tars without a marker, left by a killed pass (one pass per folder at a time)."""
    return remove_uncommitted(latent_folder(shards_dir))


def shard_samples(shard: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard, in order; an unreadable tar raises."""

    def fail(exc: BaseException) -> bool:
        raise exc

    files = wds.tariterators.tar_file_expander([{"url": shard, "stream": storage.open_input(shard)}], fail)
    return wds.tariterators.group_by_keys(files, handler=fail)


def decoded_frames(raw: dict[str, Any]) -> tuple[str, Any, int]:
    """(key, uint8 (F, H, W, 3) of every frame of the real video, the json's resolution)."""
    key = str(raw["__key__"])
    meta = SampleMeta.from_json_bytes(raw[META])
    with IndexedVideo(raw[REAL]) as video:
        if video.num_frames != meta.num_frames:
            raise ValueError(f"{REAL} holds {video.num_frames} frames, its json says {meta.num_frames}")
        frames = video.read(range(video.num_frames))  # one pass: chunked reads would re-decode each GOP
    return key, frames, meta.resolution


def encode_sample_frames(
    frames: Any, vae: torch.nn.Module, resolution: int, device: torch.device, chunk: int
) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 4, R/8, R/8) on the CPU, pixels prepared as the trainer does."""
    from model.megactor import vae_encode
    from train.augment import model_pixels, resize_frames

    scale = float(vae.config.scaling_factor)
    parts = []
    for start in range(0, len(frames), chunk):
        pixels = model_pixels(resize_frames(frames[start : start + chunk], resolution)).to(device)
        parts.append(vae_encode(vae, pixels, scale, chunk).cpu())
    return torch.cat(parts)


def member_bytes(latents: torch.Tensor, dtype: str) -> bytes:
    return save_tensors({LATENT_TENSOR: latents.to(DTYPES[dtype]).contiguous()})


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def encode_shard(
    shard: str, vae: torch.nn.Module, settings: LatentSettings, device: torch.device, chunk: int
) -> dict[str, Any]:
    """Write and commit the latent shard of one shard; returns its marker."""
    started = time.perf_counter()
    final, marker_path = latent_paths(shard)
    storage.makedirs(storage.parent_of(final))
    keys, skipped, resolutions, frames_total = [], {}, set(), 0
    with writing(final), storage.staged_file(final, suffix=".tar") as tmp:
        with open(tmp, "wb") as handle, tarfile.open(fileobj=handle, mode="w|") as tar:
            for raw in shard_samples(shard):
                key = str(raw.get("__key__"))
                try:
                    key, frames, own_resolution = decoded_frames(raw)
                except Exception as exc:  # a broken sample: the trainer counts it as bad too
                    log.warning("%s %s: no latents: %r", shard, key, exc)
                    skipped[key] = repr(exc)
                    continue
                resolution = settings.resolution or own_resolution
                resolutions.add(resolution)
                latents = encode_sample_frames(frames, vae, resolution, device, chunk)
                _add_member(tar, f"{key}.{LATENT_MEMBER}", member_bytes(latents, settings.dtype))
                keys.append(key)
                frames_total += len(latents)
        tar_bytes = tmp.stat().st_size
    if len(resolutions) > 1:
        storage.delete(final)
        raise ValueError(f"{shard}: samples of resolutions {sorted(resolutions)}: pass --resolution")
    marker = {
        "shard": storage.name_of(shard),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vae": settings.vae,
        "dtype": settings.dtype,
        "resolution": resolutions.pop() if resolutions else settings.resolution,
        "samples": len(keys),
        "keys": keys,
        "skipped": skipped,
        "frames": frames_total,
        "bytes": tar_bytes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_bytes(marker_path, json.dumps(marker, indent=1).encode())
    return marker


def require_shards(folders: list[str]) -> list[str]:
    """The committed shards of `folders`; NothingToEncode when there is none."""
    shards = [shard for folder in folders for shard in committed_shards(folder)]
    if not shards:
        raise NothingToEncode(
            f"no committed shards in {', '.join(folders) or 'the output folder (shards, gaze/shards)'}: "
            "build them first (python -m pipeline build) or name the shard folder (--shards)"
        )
    return shards


def shard_folders(out: str, names: list[str] | None) -> list[str]:
    """The shard folders to encode: `names` (relative to out, or absolute / URIs), default SHARD_FOLDERS
    that hold committed shards."""
    if names:
        return [n if storage.is_remote(n) or Path(n).is_absolute() else storage.join(out, n) for n in names]
    return [storage.join(out, n) for n in SHARD_FOLDERS if committed_names(storage.join(out, n))]


def load_vae(profile: str, weights_dir: str | None) -> torch.nn.Module:
    """The trainer's VAE: the same weights folder model.profile / model.weights_dir give the trainer
    (tiny: the shared random tiny folder; full: checked against the weights manifest)."""
    from diffusers import AutoencoderKL

    from train.config import ModelSection
    from train.ray_train import model_weights_dir

    root = model_weights_dir(ModelSection(profile=profile, weights_dir=weights_dir))
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, use_safetensors=True)
    return vae.requires_grad_(False).eval()


def run_latents(
    folders: list[str],
    vae: torch.nn.Module,
    device: torch.device,
    dtype: str = "fp32",
    resolution: int | None = None,
    chunk: int = 16,
) -> LatentSummary:
    """Encode every committed shard of `folders` that has no latents of these settings yet."""
    from model.megactor import vae_fingerprint

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    shards = require_shards(folders)
    settings = LatentSettings(vae_fingerprint(vae), dtype, resolution)
    vae = vae.to(device)
    summary = LatentSummary()
    for folder in folders:
        removed = remove_uncommitted_latents(folder)
        if removed:
            log.info("%s: removed %d uncommitted latent file(s) of an interrupted pass", folder, len(removed))
    for index, shard in enumerate(shards):
        marker = read_marker(shard)
        if marker is not None and settings.matches(marker):
            summary.cached.append(shard)
            continue
        if marker is not None:
            log.info("%s: cached with other settings (%s): encoding again", shard, _settings_of(marker))
            storage.delete(latent_paths(shard)[1])  # uncommitted first: the old marker never names new data
        try:
            marker = encode_shard(shard, vae, settings, device, chunk)
        except (OSError, ValueError, tarfile.TarError) as exc:
            if is_disk_full(exc):
                raise  # every later shard would fail the same way
            log.error("%s: %s", shard, exc)
            summary.failed[shard] = str(exc)
            continue
        summary.encoded.append(shard)
        summary.samples += marker["samples"]
        summary.frames += marker["frames"]
        summary.bytes += marker["bytes"]
        summary.skipped.update(marker["skipped"])
        log.info(
            "%d/%d %s: %d samples, %d frames",
            index + 1,
            len(shards),
            shard,
            marker["samples"],
            marker["frames"],
        )
    return summary


def _settings_of(marker: dict[str, Any]) -> str:
    return ", ".join(f"{k} {marker.get(k)}" for k in ("vae", "dtype", "resolution"))
