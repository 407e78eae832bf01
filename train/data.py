"""Shards -> training batches: a seeded WebDataset stream per Ray Train worker and DataLoader worker.

The stream of one (seed, epoch, rank) is deterministic, also with several DataLoader workers, so the
trainer resumes mid-epoch by iterating the epoch again and skipping the batches it already used.
Every rank yields exactly `steps_per_epoch` batches, so DDP ranks never wait on each other at an
epoch's end. A sample decodes only the frames it needs (pipeline.video.IndexedVideo). Shards are read
as streams through pipeline/storage.py, from a local folder or an object store (data.root=s3://...)
alike: no copy to local disk.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load as load_tensors
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import latents as latent_cache
from pipeline import storage
from pipeline.contract import (
    FACE_MASK,
    FG_MASK,
    GAZE,
    META,
    REAL,
    VIDEO_MEMBER_OF_BUCKET,
    MemberMismatch,
    SampleMeta,
    check_gaze_header,
    check_mask_header,
    decode_mask_frames,
)
from pipeline.video import IndexedVideo
from pipeline.writer import STATS_SUFFIX, read_json
from train.augment import draw_jitter, model_pixels, prepare_driving_frames, resize_frames, resize_masks

log = logging.getLogger(__name__)

STAT_NAMES = ("bad_samples", "too_short", "missing_member", "samples")
REFERENCE_DRAWS = 4  # tries for a reference frame brighter than min_reference_luma, then the brightest
MAX_FAILURES_IN_A_ROW = 1000  # a stream that only fails is a broken configuration, not bad luck
SPLITS = ("train", "val", "test")
# Where the reference frame comes from: "segment" = any frame of the clip segment (default, see the README),
# "window" = one of the num_frames window frames, the other num_frames - 1 being the targets (the paper).
REFERENCE_SOURCES = ("segment", "window")
UNSPLIT = "train"  # shards written before samples had a split: all of them were training data
# Cached VAE latents (python -m pipeline latents): auto = use them for the shards that have them and
# encode online elsewhere; required = every shard must have them; off = always encode online.
LATENT_MODES = ("auto", "off", "required")
LATENT_VAE = "__latent_vae__"  # raw-sample field: the fingerprint of the VAE that made its latents


@dataclass
class DataConfig:
    """The `data` section of a train config."""

    root: str = "out/vfhq"  # the shard builder's output folder
    shards: str = "shards"  # relative to root (or absolute): a folder of committed shards, or a glob
    split: str = "train"  # only shards whose stats say this split (shards are split-pure)
    reference: str = "segment"  # REFERENCE_SOURCES
    num_frames: int = 16
    stride: int = 2  # stage 1: 2, stage 2: 12
    resolution: int = 512  # frames are resized to this when the shards hold another size
    batch_size: int = 1  # per Ray Train worker
    num_workers: int = 4  # DataLoader processes per Ray Train worker (0 = in-process)
    shuffle_buffer: int = 32  # raw (undecoded) samples; 0 = no shuffling
    steps_per_epoch: int = 1000  # every rank yields exactly this many batches per data epoch
    scale_jitter: list[float] = field(default_factory=lambda: [0.8, 1.0])  # driving size jitter range
    aspect_jitter: list[float] = field(default_factory=lambda: [0.85, 1.15])  # width/height factor range
    min_reference_luma: float = 5.0  # the authors drop dark frames; a darker reference is redrawn
    log_every: int = 100  # log the first and every Nth bad sample of each kind
    # A shard is untrusted input: a sample whose json claims more is skipped before anything is decoded
    # (2048² x 17 decoded frames is ~200 MB; the builder writes 512² segments of at most 240 frames).
    max_sample_resolution: int = 2048
    max_sample_frames: int = 4096
    latents: str = "auto"  # LATENT_MODES

    def __post_init__(self) -> None:
        positive = ("num_frames", "stride", "resolution", "batch_size", "steps_per_epoch", "log_every")
        positive += ("max_sample_resolution", "max_sample_frames")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"data.num_workers / data.shuffle_buffer: expected >= 0, got {self.num_workers} / {self.shuffle_buffer}"
            )
        if self.split not in SPLITS:
            raise ValueError(f"data.split: expected one of {SPLITS}, got {self.split!r}")
        if self.latents not in LATENT_MODES:
            raise ValueError(f"data.latents: expected one of {LATENT_MODES}, got {self.latents!r}")
        if self.reference not in REFERENCE_SOURCES:
            raise ValueError(f"data.reference: expected one of {REFERENCE_SOURCES}, got {self.reference!r}")
        if self.reference == "window" and self.num_frames < 2:
            raise ValueError(
                "data.reference=window: expected num_frames >= 2 (one reference, the rest targets)"
            )
        for name in ("scale_jitter", "aspect_jitter"):
            bounds = [float(v) for v in getattr(self, name)]
            if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
                raise ValueError(f"data.{name}: expected [low, high] with 0 < low <= high, got {bounds}")
            setattr(self, name, bounds)

    @property
    def span(self) -> int:
        """Frames a clip needs: num_frames at stride."""
        return (self.num_frames - 1) * self.stride + 1


class SampleSkipped(Exception):
    """A sample the loader cannot use by design (not a broken file); `reason` is one of the stat names."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoShards(FileNotFoundError):
    """No committed shard of the asked split (e.g. a shard set without held-out clips)."""


_warned_unsplit: set[str] = set()


class BadStats(ValueError):
    """A shard's stats marker that is not a json object (truncated, or not written by a shard builder)."""


def shard_split(stats_path: str | Path) -> str:
    """The split a shard holds, from its stats marker; shards written before splits existed count as train."""
    try:
        stats = read_json(stats_path)
    except ValueError as exc:
        raise BadStats(str(exc)) from exc
    if not isinstance(stats, dict):
        raise BadStats(f"{stats_path}: a json {type(stats).__name__}, expected an object")
    split = stats.get("split")
    if split is None:
        folder = storage.parent_of(str(stats_path))
        if folder not in _warned_unsplit:  # once per folder
            _warned_unsplit.add(folder)
            log.warning("shards in %s have no split in their stats: all are read as %r", folder, UNSPLIT)
        return UNSPLIT
    return str(split)


def _candidate_tars(location: str) -> list[str]:
    """The .tar files of a folder (or prefix), or those matching a glob in the last path part."""
    if any(char in location for char in "*?["):
        if not storage.is_remote(location):
            return sorted(p for p in glob.glob(location) if p.endswith(".tar"))
        folder, pattern = storage.parent_of(location), storage.name_of(location)
        names = fnmatch.filter(storage.list_names(folder), pattern)
        return [storage.join(folder, n) for n in sorted(names) if n.endswith(".tar")]
    names = storage.list_names(location)
    if not names and not (storage.is_remote(location) or Path(location).is_dir()):
        raise FileNotFoundError(f"shard folder {location} does not exist (data.root / data.shards)")
    return [storage.join(location, n) for n in names if n.endswith(".tar")]


def list_shards(config: DataConfig) -> list[str]:
    """Committed shards (those with a stats file: the writer's commit marker) of config.split, sorted.

    A folder or an object-store prefix; only each shard's small stats json is read, never another
    split's tar, and a tar without its marker (being written, or left by a killed build) is never listed.
    """
    shards = config.shards
    if storage.is_remote(shards) or Path(shards).is_absolute():
        location = shards
    else:
        location = storage.join(config.root, shards)
    tars = _candidate_tars(location)
    markers = {p: p[: -len(".tar")] + STATS_SUFFIX for p in tars}
    listed = {folder: set(storage.list_names(folder)) for folder in {storage.parent_of(p) for p in tars}}
    committed = [p for p in tars if storage.name_of(markers[p]) in listed[storage.parent_of(p)]]
    if not committed:
        raise FileNotFoundError(
            f"no committed shards in {location}: found {len(tars)} .tar files, none with a {STATS_SUFFIX} marker"
        )
    splits = _readable_splits(committed, markers)
    chosen = [p for p in committed if splits.get(p) == config.split]
    if not chosen:
        found = sorted(set(splits.values()))
        unreadable = len(committed) - len(splits)
        raise NoShards(
            f"no {config.split!r} shards in {location}: its {len(committed)} shards hold {found}"
            + (f", {unreadable} with an unreadable {STATS_SUFFIX} (see the warnings)" if unreadable else "")
        )
    return chosen


def _readable_splits(tars: list[str], markers: dict[str, str]) -> dict[str, str]:
    """{tar: split} of the shards whose stats marker reads; one warning names each shard left out."""
    splits = {}
    for tar in tars:
        try:
            splits[tar] = shard_split(markers[tar])
        except BadStats as exc:
            log.warning(
                "shard %s left out: its stats marker is unreadable: %s. Rebuild that shard.", tar, exc
            )
    return splits


def latent_sources(config: DataConfig, shards: list[str]) -> dict[str, dict[str, str]]:
    """{shard: {"latents": latent tar, "latent_vae": fingerprint}} of the shards whose cached latents the
    trainer can use (committed, at data.resolution); {} with data.latents=off.

    The targets and the reference are only resized, never augmented (train/augment.py jitters the
    driving frames alone), so latents cached from the plain frames are what the online encode computes.
    Raises FileNotFoundError naming every missing latent file with data.latents=required.
    """
    if config.latents == "off":
        return {}
    sources, missing, other = {}, [], []
    listed = latent_cache.listed_latents(shards)
    for shard in shards:
        tar, marker_path = latent_cache.latent_paths(shard)
        marker = latent_cache.read_marker(shard, listed[storage.parent_of(shard)])
        if marker is None:
            missing.append(marker_path)
        elif marker.get("resolution") != config.resolution:
            other.append(f"{marker_path} (resolution {marker.get('resolution')})")
        else:
            sources[shard] = {"latents": tar, "latent_vae": str(marker.get("vae"))}
    unusable = missing + other
    if unusable and config.latents == "required":
        raise FileNotFoundError(
            f"data.latents=required: {len(unusable)} of {len(shards)} shards have no cached latents at "
            f"data.resolution {config.resolution}: " + ", ".join(unusable[:10])
            + (f" and {len(unusable) - 10} more" if len(unusable) > 10 else "")
            + ". Run python -m pipeline latents --out <data.root> --resolution "
            f"{config.resolution} (make latents), or set data.latents=auto"
        )  # fmt: skip
    if unusable and sources:
        log.info(
            "cached latents for %d of %d shards; the others are encoded online", len(sources), len(shards)
        )
    elif sources:
        log.info("cached latents for all %d shards", len(shards))
    return sources


def open_shards(
    src: Iterable[dict[str, Any]], handler: Callable[[BaseException], bool]
) -> Iterator[dict[str, Any]]:
    """{"url"} -> {"url", "stream"}: each shard as a forward-only stream from its filesystem (webdataset's
    own opener knows local files and shell pipes, not an object store's API)."""
    for sample in src:
        try:
            yield {**sample, "stream": storage.open_input(sample["url"])}
        except Exception as exc:
            exc.args = (*exc.args, sample["url"])
            if not handler(exc):
                break


class TarSamples:
    """Pipeline stage: {"url"[, "latents", "latent_vae"]} -> raw samples {"__key__", "__url__", member:
    bytes}, each with its cached-latent member when the shard has a latent shard (a class: DataLoader
    workers are spawned, so the pipeline must pickle)."""

    def __init__(self, handler: Callable[[BaseException], bool]) -> None:
        self.handler = handler

    def _samples(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        files = wds.tariterators.tar_file_expander(open_shards(shards, self.handler), handler=self.handler)
        return wds.tariterators.group_by_keys(files, handler=self.handler)

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            samples = self._samples([shard])
            yield from self._with_latents(samples, shard) if shard.get("latents") else samples

    def _with_latents(
        self, samples: Iterator[dict[str, Any]], shard: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        """The shard's samples joined with its latent shard, read alongside: the latent shard holds the
        same keys in the same order, less the samples the pass could not decode."""
        cached = self._samples([{"url": shard["latents"]}])
        pending = next(cached, None)
        for sample in samples:
            if pending is not None and pending.get("__key__") == sample.get("__key__"):
                if latent_cache.LATENT_MEMBER in pending:
                    sample[latent_cache.LATENT_MEMBER] = pending[latent_cache.LATENT_MEMBER]
                    sample[LATENT_VAE] = shard["latent_vae"]
                pending = next(cached, None)
            yield sample


def _mean_luma(frame: np.ndarray) -> float:
    return float(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).mean())


def _bright_reference(
    rng: random.Random,
    count: int,
    first: int,
    frame: np.ndarray,
    read: Callable[[int], np.ndarray],
    min_luma: float,
) -> tuple[int, np.ndarray]:
    """(index, frame) of the reference: redrawn among `count` frames while darker than min_luma, up to
    REFERENCE_DRAWS draws in all, the brightest one kept."""
    index, luma = first, _mean_luma(frame)
    for _ in range(REFERENCE_DRAWS - 1):
        if luma >= min_luma:
            break
        candidate = rng.randrange(count)
        other = read(candidate)
        other_luma = _mean_luma(other)
        if other_luma > luma:
            index, frame, luma = candidate, other, other_luma
    return index, frame


def _check_claims(meta: SampleMeta, key: str, config: DataConfig) -> None:
    """The json's own size claims, against the config's limits: nothing is decoded beyond them."""
    if not 1 <= meta.resolution <= config.max_sample_resolution:
        raise SampleSkipped(
            "bad_samples",
            f"{key}: its json says resolution {meta.resolution}, expected 1..{config.max_sample_resolution} "
            "(data.max_sample_resolution)",
        )
    if not 1 <= meta.num_frames <= config.max_sample_frames:
        raise SampleSkipped(
            "bad_samples",
            f"{key}: its json says {meta.num_frames} frames, expected 1..{config.max_sample_frames} "
            "(data.max_sample_frames)",
        )


def _check_video_header(data: bytes, member: str, meta: SampleMeta, key: str) -> None:
    """A video's declared size and frame count (container header, no frame decoded) against the json."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise SampleSkipped("bad_samples", f"{key}: {member} holds no video stream")
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
        frames = stream.frames  # 0 where the container does not say (the packets are counted later)
    expected = (meta.resolution, meta.resolution)
    if size != expected:
        raise SampleSkipped(
            "bad_samples",
            f"{key}: {member} is {size[0]}x{size[1]}, its json says {expected[0]}x{expected[1]}",
        )
    if frames and frames != meta.num_frames:
        raise SampleSkipped(
            "bad_samples", f"{key}: {member} declares {frames} frames, its json says {meta.num_frames}"
        )


def _check_headers(raw: dict[str, Any], members: list[str], meta: SampleMeta, key: str) -> None:
    """Every member's declared sizes against the json, before any large allocation."""
    for member in dict.fromkeys(members):
        if member.endswith(".mp4"):
            _check_video_header(raw[member], member, meta, key)
    shape = (meta.num_frames, meta.resolution, meta.resolution)
    checks: list[tuple[str, Callable[[bytes], None]]] = [
        (FACE_MASK, lambda data: check_mask_header(data, shape)),
        (FG_MASK, lambda data: check_mask_header(data, shape)),
    ]
    if GAZE in raw:  # optional: only samples the gaze stage ran on carry it
        checks.append((GAZE, lambda data: check_gaze_header(data, meta.num_frames)))
    for member, check in checks:
        try:
            check(raw[member])
        except MemberMismatch as exc:
            raise SampleSkipped("bad_samples", f"{key}: {member}: {exc}") from exc


def decode_sample(raw: dict[str, Any], config: DataConfig, rng: random.Random) -> dict[str, Any]:
    """One raw shard sample -> target, reference, driving and background mask at config.resolution.

    Raises SampleSkipped for a clip shorter than the frames asked for, a member missing, or a member
    whose header disagrees with the json or claims more than the config's limits (checked before any
    frame is decoded or mask inflated); any other error means a broken sample, which the stream counts as bad.
    """
    key = str(raw.get("__key__", "?"))
    if META not in raw:
        raise SampleSkipped("missing_member", f"{key}: no {META} member")
    meta = SampleMeta.from_json_bytes(raw[META])
    if meta.bucket not in VIDEO_MEMBER_OF_BUCKET:
        raise ValueError(f"{key}: bucket {meta.bucket!r}, expected one of {sorted(VIDEO_MEMBER_OF_BUCKET)}")
    driving_member = VIDEO_MEMBER_OF_BUCKET[meta.bucket]
    needed = [REAL, driving_member, FACE_MASK, FG_MASK]
    missing = [m for m in dict.fromkeys(needed) if m not in raw]
    if missing:
        raise SampleSkipped("missing_member", f"{key} ({meta.bucket}): no {', '.join(missing)}")
    _check_claims(meta, key, config)
    length = meta.num_frames
    if length < config.span:
        raise SampleSkipped(
            "too_short",
            f"{key}: {length} frames, {config.num_frames} frames at stride {config.stride} need {config.span}",
        )
    _check_headers(raw, needed, meta, key)

    start = rng.randint(0, length - config.span)
    indices = [start + config.stride * k for k in range(config.num_frames)]
    cached_member = raw.get(latent_cache.LATENT_MEMBER) if config.latents != "off" else None
    if cached_member is None and config.latents == "required":
        raise SampleSkipped(
            "missing_member",
            f"{key}: no cached latents ({latent_cache.LATENT_MEMBER}), data.latents=required",
        )
    with IndexedVideo(raw[REAL]) as real:
        if real.num_frames != length:
            raise ValueError(f"{key}: {REAL} holds {real.num_frames} frames, its json says {length}")
        if config.reference == "window":  # one window frame is the reference, the others the targets
            frames = real.read(indices)
            first = rng.randrange(len(indices))
            position, reference = _bright_reference(
                rng, len(indices), first, frames[first], lambda k: frames[k], config.min_reference_luma
            )
            reference_index = indices[position]
            target = np.delete(frames, position, axis=0)
            indices = indices[:position] + indices[position + 1 :]
        else:  # any frame of the segment
            first = rng.randrange(length)
            frames = real.read([*indices, first])  # one pass; a far reference costs one more seek
            target = frames[:-1]
            reference_index, reference = _bright_reference(
                rng, length, first, frames[-1], lambda i: real.read([i])[0], config.min_reference_luma
            )
    if driving_member == REAL:
        driving = target
    else:
        with IndexedVideo(raw[driving_member]) as video:
            if video.num_frames != length:
                raise ValueError(f"{key}: {driving_member} holds {video.num_frames} frames, {REAL} {length}")
            driving = video.read(indices)
    face = decode_mask_frames(raw[FACE_MASK], indices)
    foreground = decode_mask_frames(raw[FG_MASK], [reference_index])
    if face.shape[1:] != target.shape[1:3] or foreground.shape[1:] != target.shape[1:3]:
        raise ValueError(
            f"{key}: masks {face.shape[1:]} / {foreground.shape[1:]}, frames {target.shape[1:3]}"
        )

    size = config.resolution
    jitter = draw_jitter(rng, config.scale_jitter, config.aspect_jitter)
    background = ~resize_masks(foreground, size)  # (1, R, R) True = background
    cached = {}
    if cached_member is not None:
        cached = cached_latents(cached_member, length, size, indices, reference_index, key)
        cached["latent_vae"] = str(raw.get(LATENT_VAE))
    return {
        **cached,
        "reference": model_pixels(resize_frames(reference[None], size))[0],  # (3, R, R)
        "driving": model_pixels(prepare_driving_frames(driving, face, size, jitter)),  # (F, 3, R, R)
        "background_mask": torch.from_numpy(background).float(),  # (1, R, R)
        "target": model_pixels(resize_frames(target, size)),  # (F, 3, R, R)
        "key": key,
        "frame_indices": np.asarray(indices, np.int64),
        "reference_index": reference_index,
        "bucket": meta.bucket,
    }


def cached_latents(
    data: bytes, length: int, resolution: int, indices: list[int], reference_index: int, key: str
) -> dict[str, torch.Tensor]:
    """A latent member -> "target_latents" (F, 4, h, w) and "reference_latent" (4, h, w), float32."""
    latents = load_tensors(data)[latent_cache.LATENT_TENSOR]
    side = resolution // 8
    if latents.ndim != 4 or latents.shape[0] != length or tuple(latents.shape[2:]) != (side, side):
        raise ValueError(
            f"{key}: cached latents {tuple(latents.shape)}, expected ({length}, C, {side}, {side})"
        )
    return {"target_latents": latents[indices].float(), "reference_latent": latents[reference_index].float()}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    # One sample (batch_size 1, the 512² default) needs no copy.
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def collate(samples: list[dict[str, Any]], stats: dict[str, int]) -> dict[str, Any]:
    """Decoded samples -> one batch (see make_loader)."""
    return {
        **_collate_latents(samples),
        "reference": _stack([s["reference"] for s in samples]),
        "driving": _stack([s["driving"] for s in samples]),
        "background_mask": _stack([s["background_mask"] for s in samples]),
        "target": _stack([s["target"] for s in samples]),
        "key": [s["key"] for s in samples],
        "frame_indices": torch.from_numpy(np.stack([s["frame_indices"] for s in samples])),
        "reference_index": torch.tensor([s["reference_index"] for s in samples], dtype=torch.int64),
        "bucket": [s["bucket"] for s in samples],
        "stats": stats,
    }


def _collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The cached latents of a batch whose samples all have them from one VAE; {} otherwise (encoded online)."""
    if not all("target_latents" in s for s in samples) or len({s["latent_vae"] for s in samples}) != 1:
        return {}
    return {
        "target_latents": _stack([s["target_latents"] for s in samples]),
        "reference_latent": _stack([s["reference_latent"] for s in samples]),
        "latent_vae": samples[0]["latent_vae"],
    }


def _worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in-process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stream_rng(purpose: str, seed: int, epoch: int, rank: int) -> random.Random:
    """A generator owned by one (seed, epoch, rank, DataLoader worker) and one pipeline step."""
    worker, _ = _worker_slot()
    return random.Random(f"{purpose}:{seed}:{epoch}:{rank}:{worker}")


class StreamStats:
    """One DataLoader worker's counts of dropped samples; logs the first and every Nth of each kind."""

    def __init__(self, rank: int, log_every: int) -> None:
        self.rank, self.log_every = rank, log_every
        self.pending = dict.fromkeys(STAT_NAMES, 0)  # since the previous batch
        self.totals = dict.fromkeys(STAT_NAMES, 0)
        self.failures_in_a_row = 0

    def count(self, name: str) -> None:
        self.pending[name] += 1
        self.totals[name] += 1

    def failed(self, name: str, message: str) -> None:
        self.count(name)
        self.failures_in_a_row += 1
        total = self.totals[name]
        if total == 1 or total % self.log_every == 0:
            worker, _ = _worker_slot()
            log.warning("rank %d worker %d: %s #%d: %s", self.rank, worker, name, total, message)
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise RuntimeError(
                f"{self.failures_in_a_row} samples in a row unusable ({self.totals}); last: {message}. "
                "Check the shards and data.num_frames x data.stride against the clip lengths."
            )

    def succeeded(self) -> None:
        self.failures_in_a_row = 0

    def tar_error(self, exc: BaseException) -> bool:
        """WebDataset handler: count unreadable shard data (a truncated tar) and go on."""
        self.failed("bad_samples", f"unreadable shard data: {exc}")
        return True

    def take(self) -> dict[str, int]:
        out, self.pending = self.pending, dict.fromkeys(STAT_NAMES, 0)
        return out


class SharedEpoch:
    """The data epoch, in shared memory: persistent DataLoader workers outlive an epoch and read the
    current value each time a pass over the stream starts (EpochLoader.set_epoch before iterating)."""

    def __init__(self, epoch: int = 0) -> None:
        self.value = multiprocessing.get_context("spawn").Value("q", epoch, lock=False)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return int(self.value.value)


def _epoch_of(epoch: int | SharedEpoch) -> int:
    return epoch.get() if isinstance(epoch, SharedEpoch) else epoch


class ShardStream(IterableDataset):
    """{"url"} of endless shard passes, each a permutation drawn from Random(seed, epoch).

    The passes are dealt round-robin to the world_size x num_workers (rank, worker) slots, so within a
    pass no two slots read the same shard (when there are enough shards), and any shard count works.
    """

    def __init__(
        self,
        urls: list[str],
        seed: int,
        epoch: int | SharedEpoch,
        rank: int,
        world_size: int,
        latents: dict[str, dict[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch, self.rank, self.world_size = urls, seed, epoch, rank, world_size
        self.latents = latents or {}  # latent_sources()

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = _worker_slot()
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        rng = random.Random(f"shards:{self.seed}:{_epoch_of(self.epoch)}")  # the same passes in every slot
        dealt = 0
        while True:
            order = list(self.urls)
            rng.shuffle(order)
            for url in order:
                if dealt % slots == slot:
                    yield {"url": url, **self.latents.get(url, {})}
                dealt += 1


class Shuffle:
    """Seeded buffer shuffle of raw samples (per worker: Random(seed, epoch, rank, worker))."""

    def __init__(self, size: int, seed: int, epoch: int | SharedEpoch, rank: int) -> None:
        self.size, self.seed, self.epoch, self.rank = size, seed, epoch, rank

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.size == 0:  # no shuffling: shard order
            yield from source
            return
        rng = _stream_rng("shuffle", self.seed, _epoch_of(self.epoch), self.rank)
        buffer: list[dict[str, Any]] = []
        for sample in source:
            if len(buffer) < self.size:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


class Decode:
    """Raw samples -> decoded samples; skipped and broken ones are counted, logged and dropped."""

    def __init__(
        self, config: DataConfig, seed: int, epoch: int | SharedEpoch, rank: int, stats: StreamStats
    ) -> None:
        self.config, self.seed, self.epoch, self.rank, self.stats = config, seed, epoch, rank, stats

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = _stream_rng("decode", self.seed, _epoch_of(self.epoch), self.rank)
        for raw in source:
            self.stats.count("samples")
            try:
                sample = decode_sample(raw, self.config, rng)
            except SampleSkipped as exc:
                self.stats.failed(exc.reason, f"{raw.get('__url__')}: {exc}")
                continue
            except Exception as exc:  # a broken sample must not stop training
                self.stats.failed("bad_samples", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
                continue
            self.stats.succeeded()
            yield sample


class Batch:
    """Decoded samples -> batches carrying the worker's counts since its previous batch."""

    def __init__(self, batch_size: int, stats: StreamStats) -> None:
        self.batch_size, self.stats = batch_size, stats

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        samples = []
        for sample in source:
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield collate(samples, self.stats.take())
                samples = []


class EpochShare:
    """with_epoch, per worker: this worker's share of steps_per_epoch (they add up to it exactly)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_slot()
        share = self.steps // num_workers + (1 if worker < self.steps % num_workers else 0)
        count = 0
        if share == 0:
            return
        for batch in source:
            yield batch
            count += 1
            if count == share:
                return  # before pulling (and decoding) one batch more
        raise RuntimeError(f"the shard stream ended after {count} of {share} batches")


def build_pipeline(
    config: DataConfig, seed: int, epoch: int | SharedEpoch, rank: int, world_size: int
) -> wds.DataPipeline:
    """The stream of one rank, as DataLoader workers run it (each worker owns a copy of the stats)."""
    stats = StreamStats(rank, config.log_every)
    shards = list_shards(config)
    return wds.DataPipeline(
        # {"url"[, "latents"]}: endless seeded shard passes, this (rank, worker) slot's share of them
        ShardStream(shards, seed, epoch, rank, world_size, latent_sources(config, shards)),
        # raw samples {"__key__", "real.mp4", "face.npz", ..., cached latents}; unreadable tar data
        # counted, then skipped
        TarSamples(stats.tar_error),
        # raw samples, seeded buffer shuffle
        Shuffle(config.shuffle_buffer, seed, epoch, rank),
        # decoded samples (tensors); too-short, incomplete and broken samples counted, then skipped
        Decode(config, seed, epoch, rank, stats),
        # batches (+ "stats")
        Batch(config.batch_size, stats),
        # this worker's share of steps_per_epoch batches
        EpochShare(config.steps_per_epoch),
    )


def _init_worker(_: int) -> None:
    # One DataLoader worker = one core: threaded resizes in several workers only contend.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class EpochLoader:
    """The data epochs of one rank: each iteration yields exactly `steps_per_epoch` batches (len() says
    how many) of the epoch last set; the same DataLoader worker processes serve every epoch."""

    def __init__(self, loader: DataLoader, steps: int, epoch: SharedEpoch) -> None:
        self.loader, self.steps, self.shared_epoch = loader, steps, epoch

    @property
    def epoch(self) -> int:
        return self.shared_epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (its shard order, shuffle and crops)."""
        if epoch < 0:
            raise ValueError(f"data epoch: expected >= 0, got {epoch}")
        self.shared_epoch.set(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)


def make_loader(
    config: DataConfig, *, seed: int, epoch: int, rank: int, world_size: int, pin_memory: bool = False
) -> EpochLoader:
    """The batches of one rank, starting at data epoch `epoch` (loader.set_epoch moves on, keeping the
    worker processes); the same (seed, epoch, rank, config) gives the same batches.

    A batch: "reference" (B, 3, H, W), "driving" and "target" (B, F, 3, H, W), float32 in [-1, 1]
    (F = num_frames, or num_frames - 1 with reference=window);
    "background_mask" (B, 1, H, W) 1 = background of the reference frame; "key", "bucket" lists;
    "frame_indices" (B, F) and "reference_index" (B,) int64; "stats" {name: count} since the previous
    batch of the DataLoader worker that made it (sum them over batches, workers and ranks); where every
    sample has cached latents (data.latents), "target_latents" (B, F, 4, h, w), "reference_latent"
    (B, 4, h, w) float32 and "latent_vae" (the fingerprint of the VAE that made them).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    shared_epoch = SharedEpoch(epoch)
    pipeline = build_pipeline(config, seed, shared_epoch, rank, world_size)
    loader = DataLoader(
        pipeline,
        batch_size=None,  # the pipeline batches
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if config.num_workers else None,
        # Ray Train workers (and test processes) run threads; a forked child can inherit a held lock and
        # hang forever, so workers start from a fresh interpreter.
        multiprocessing_context="spawn" if config.num_workers else None,
        # Kept across epochs (set_epoch): a spawned worker spends seconds importing before its first batch.
        persistent_workers=config.num_workers > 0,
    )
    return EpochLoader(loader, config.steps_per_epoch, shared_epoch)


def fixed_batch(config: DataConfig, count: int, seed: int = 0, allow_fewer: bool = False) -> dict[str, Any]:
    """The first `count` usable samples in sorted shard order as one batch, frames and jitter from Random(seed).

    No resampling or shuffling: the same shards give the same batch (validation, learning tests).
    allow_fewer: a batch of the usable samples there are when fewer than `count` (at least one).
    """
    rng = random.Random(seed)
    stats = StreamStats(rank=0, log_every=config.log_every)
    samples: list[dict[str, Any]] = []
    shards = list_shards(config)
    sources = latent_sources(config, shards)
    raw_samples = TarSamples(stats.tar_error)([{"url": url, **sources.get(url, {})} for url in shards])
    for raw in raw_samples:
        stats.count("samples")
        try:
            samples.append(decode_sample(raw, config, rng))
        except SampleSkipped as exc:
            stats.failed(exc.reason, f"{raw.get('__url__')}: {exc}")
            continue
        except Exception as exc:  # the same samples count as broken here as in the stream
            stats.failed("bad_samples", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
            continue
        stats.succeeded()
        if len(samples) == count:
            return collate(samples, stats.take())
    if allow_fewer and samples:
        return collate(samples, stats.take())
    raise ValueError(
        f"fixed_batch: asked for {count} usable samples, the shards hold {len(samples)} ({stats.totals})"
    )
