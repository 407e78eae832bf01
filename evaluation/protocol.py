"""Protocol files: a fixed evaluation set (clips with their frames and reference frame, cross pairs,
metric settings) written once with `python -m evaluation protocol make`, so that our checkpoints
(`run --protocol FILE`) and any other method's videos (`compare --protocol FILE --pred-dir DIR`) are
scored on exactly the same frames. The file carries a content hash that metrics.json records.

Clips are the split's samples in sorted shard order (each shard's index part, no video decoded), every
`stride`-th frame from the clip's first, `num_frames` of them; the reference is one frame of the clip
(its first unless told). A clip shorter than that window is excluded, with the reason kept in the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.distribution import DEFAULT_PROTOCOL, PROTOCOLS
from pipeline import storage
from pipeline.writer import INDEX_SUFFIX, read_parquet

log = logging.getLogger(__name__)

FORMAT = "megactor-eval-protocol/1"
REFERENCES = ("first", "middle", "last")  # which frame of the clip's window is the identity reference
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Benchmark:
    """A protocol file's content; `hash` is the sha256 of everything else (see content_hash)."""

    shards: str
    split: str
    num_frames: int
    stride: int
    reference: str
    resolution: int
    seed: int
    clips: list[dict[str, Any]]  # key, identity, shard, frames (source indices), reference_frame
    cross_pairs: list[dict[str, str]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # key -> why it is not in the set
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    hash: str = ""

    def content(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "hash"}

    @property
    def keys(self) -> list[str]:
        return [clip["key"] for clip in self.clips]


def content_hash(content: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a protocol's content."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def cross_pairs(identities: list[str], seed: int) -> list[tuple[int, int]]:
    """(reference, driving) index pairs: every clip drives the reference of a clip of another identity,
    drawn from Random(seed); a clip whose identity is the only one held out gets no pair."""
    rng = random.Random(f"cross:{seed}")
    pairs = []
    for drv, who in enumerate(identities):
        others = [ref for ref, other in enumerate(identities) if other != who]
        if others:
            pairs.append((rng.choice(others), drv))
    if not pairs:
        raise ValueError(
            f"cross reenactment needs held-out clips of 2 identities; the {len(identities)} clips are all "
            f"{identities[0]!r}: raise --num-clips or use a split with more people"
        )
    return pairs


def tasks_of(benchmark: Benchmark) -> list[tuple[str, str, str]]:
    """(setting, reference clip, driving clip) in scoring order: every clip, then every cross pair."""
    own = [("self", key, key) for key in benchmark.keys]
    return own + [("cross", p["reference_clip"], p["driving_clip"]) for p in benchmark.cross_pairs]


def task_name(setting: str, reference: str, driving: str) -> str:
    return f"cross:{reference}<-{driving}" if setting == "cross" else f"self:{driving}"


def metric_settings(distribution: str, backend: str, resolution: int) -> dict[str, Any]:
    from evaluation.scoring import METRICS

    rules = PROTOCOLS[distribution]
    return {
        "names": list(METRICS),
        "backend": backend,
        "resolution": resolution,
        "distribution": asdict(rules),
    }


def index_rows(shards: str, split: str) -> list[dict[str, Any]]:
    """The split's samples in sorted shard order, from the index parts beside its committed shards."""
    from train.data import DataConfig, list_shards

    rows: list[dict[str, Any]] = []
    for tar in list_shards(DataConfig(root=str(shards), split=split, num_workers=0)):
        part = tar[: -len(".tar")] + INDEX_SUFFIX
        if not storage.is_file(part):
            raise FileNotFoundError(f"{part}: no index part beside {tar}: rebuild the shard set")
        index = read_parquet(part, "rebuild the shard set: its index parts list each clip")
        for row in index.to_dict("records"):
            rows.append({**row, "shard": storage.name_of(tar)})
    return rows


def clip_window(length: int, num_frames: int, stride: int, reference: str) -> tuple[list[int], int] | str:
    """(frame indices, reference frame) of a clip of `length` frames, or why it cannot give them."""
    span = (num_frames - 1) * stride + 1
    if length < span:
        return f"{length} frames; {num_frames} frames at stride {stride} need {span}"
    frames = list(range(0, span, stride))
    position = {"first": 0, "middle": len(frames) // 2, "last": len(frames) - 1}[reference]
    return frames, frames[position]


def select_clips(
    rows: list[dict[str, Any]], num_clips: int, num_frames: int, stride: int, reference: str
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The first num_clips usable clips (0: all) and the reasons the others before them were left out."""
    clips, excluded = [], {}
    for row in rows:
        if num_clips and len(clips) == num_clips:
            break
        window = clip_window(int(row["num_frames"]), num_frames, stride, reference)
        if isinstance(window, str):
            excluded[str(row["key"])] = window
            continue
        clips.append({
            "key": str(row["key"]), "identity": str(row.get("identity") or ""), "shard": row["shard"],
            "frames": window[0], "reference_frame": window[1],
        })  # fmt: skip
    return clips, excluded


def report_shortfall(asked: int, clips: list[dict[str, Any]], excluded: dict[str, str], split: str) -> None:
    """Say which clips were left out and why, and when fewer clips than asked remain."""
    for key, reason in excluded.items():
        log.warning("clip %s skipped: %s", key, reason)
    if asked and len(clips) < asked:
        why = "; ".join(f"{k}: {r}" for k, r in excluded.items()) or "no more clips in the split"
        log.warning("asked for %d clips, the %r split has %d usable (%s)", asked, split, len(clips), why)


def make_benchmark(
    shards: str,
    split: str = "test",
    num_clips: int = 0,
    num_frames: int = 16,
    stride: int = 1,
    reference: str = "first",
    resolution: int = 512,
    seed: int = 0,
    cross: bool = True,
    distribution: str = DEFAULT_PROTOCOL,
    backend: str = "insightface",
) -> Benchmark:
    """The protocol of a shard set's split (see the module docstring); cross pairs (different
    identities, drawn from the seed) when the split holds two people or more and `cross`."""
    if reference not in REFERENCES:
        raise ValueError(f"reference {reference!r}: expected one of {REFERENCES}")
    if num_frames < 1 or stride < 1 or num_clips < 0:
        raise ValueError("num_frames and stride must be >= 1, num_clips >= 0 (0: every clip)")
    if distribution not in PROTOCOLS:
        raise ValueError(f"distribution protocol {distribution!r}: expected one of {sorted(PROTOCOLS)}")
    clips, excluded = select_clips(index_rows(shards, split), num_clips, num_frames, stride, reference)
    report_shortfall(num_clips, clips, excluded, split)
    if not clips:
        raise ValueError(
            f"no clip of the {split!r} split of {shards} is long enough: {excluded}; lower --num-frames or --stride"
        )
    pairs: list[dict[str, str]] = []
    if cross and len({c["identity"] for c in clips}) > 1:
        for ref, drv in cross_pairs([c["identity"] for c in clips], seed):
            pairs.append({
                "reference_clip": clips[ref]["key"], "reference_identity": clips[ref]["identity"],
                "driving_clip": clips[drv]["key"], "driving_identity": clips[drv]["identity"],
            })  # fmt: skip
    elif cross:
        log.warning("no cross pairs: every clip of the %r split is one identity", split)
    benchmark = Benchmark(
        shards=str(shards), split=split, num_frames=num_frames, stride=stride, reference=reference,
        resolution=resolution, seed=seed, clips=clips, cross_pairs=pairs, excluded=excluded,
        metrics=metric_settings(distribution, backend, resolution),
    )  # fmt: skip
    benchmark.hash = content_hash(benchmark.content())
    return benchmark


def write_benchmark(benchmark: Benchmark, path: str | Path) -> None:
    """JSON, or YAML when the name ends in .yaml / .yml; written whole or not at all."""
    from pipeline.writer import atomic_write_bytes

    data = {**benchmark.content(), "hash": benchmark.hash}
    if str(path).endswith(YAML_SUFFIXES):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    else:
        text = json.dumps(data, indent=1) + "\n"
    atomic_write_bytes(path, text.encode())


def read_benchmark(path: str | Path) -> Benchmark:
    """A protocol file, its hash checked against its content (an edited file is refused)."""
    if not storage.is_file(str(path)):
        raise FileNotFoundError(
            f"{path}: no such protocol file (write one with `python -m evaluation protocol make`)"
        )
    text = storage.read_text(str(path))
    if str(path).endswith(YAML_SUFFIXES):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a protocol file (format {FORMAT!r} expected)")
    stored = data.pop("hash", "")
    try:
        benchmark = Benchmark(**data)
    except TypeError as exc:
        raise ValueError(f"{path}: not a protocol file of format {FORMAT}: {exc}") from exc
    actual = content_hash(benchmark.content())
    if stored != actual:
        raise ValueError(
            f"{path}: its content hash is {actual}, the file says {stored}: the file was edited; "
            "make a new one with `python -m evaluation protocol make`"
        )
    benchmark.hash = stored
    return benchmark


def shard_samples(benchmark: Benchmark, shards: str | None = None) -> dict[str, dict[str, Any]]:
    """The raw shard samples (member bytes) of the protocol's clips, read from the shards that hold them."""
    import webdataset as wds

    from pipeline.contract import FACE_MASK, FG_MASK, META, REAL, STYLE, SWAP
    from train.data import DataConfig, TarSamples, list_shards

    wanted = set(benchmark.keys) | {p["reference_clip"] for p in benchmark.cross_pairs}
    names = {clip["shard"] for clip in benchmark.clips}
    config = DataConfig(root=str(shards or benchmark.shards), split=benchmark.split, num_workers=0)
    tars = [tar for tar in list_shards(config) if storage.name_of(tar) in names]

    def unreadable(exc: BaseException) -> bool:
        log.warning("unreadable shard data: %s", exc)
        return True

    members = {META, REAL, SWAP, STYLE, FACE_MASK, FG_MASK}  # not gaze, not the rest of the shard
    found = {}
    for raw in wds.DataPipeline(wds.SimpleShardList(tars), TarSamples(unreadable)):
        if raw.get("__key__") in wanted:
            found[raw["__key__"]] = {k: v for k, v in raw.items() if k in members or k.startswith("__")}
    return found


def ground_truth(raw: dict[str, Any], clip: dict[str, Any], resolution: int) -> dict[str, np.ndarray]:
    """uint8 frames of a clip at the protocol's resolution: `target` [T,R,R,3] (the clip's real video at
    the protocol's frames) and `reference` [1,R,R,3] (its reference frame)."""
    from pipeline.contract import REAL
    from pipeline.video import IndexedVideo
    from train.augment import resize_frames

    frames, reference = list(clip["frames"]), int(clip["reference_frame"])
    with IndexedVideo(raw[REAL]) as video:
        if video.num_frames <= max(*frames, reference):
            raise ValueError(
                f"{REAL} holds {video.num_frames} frames, the protocol needs frame {max(frames)}"
            )
        decoded = video.read([*frames, reference])
    decoded = resize_frames(decoded, resolution)
    return {"target": decoded[:-1], "reference": decoded[-1:]}


def model_inputs(raw: dict[str, Any], clip: dict[str, Any], resolution: int) -> dict[str, Any]:
    """What the sampling pipeline takes for a clip (as train.data.decode_sample prepares it, with the
    protocol's frames and reference and no jitter) and its uint8 ground truth."""
    import torch

    from pipeline.contract import (
        FACE_MASK,
        FG_MASK,
        META,
        VIDEO_MEMBER_OF_BUCKET,
        SampleMeta,
        decode_mask_frames,
    )
    from pipeline.video import IndexedVideo
    from train.augment import Jitter, model_pixels, prepare_driving_frames, resize_masks

    truth = ground_truth(raw, clip, resolution)
    frames = list(clip["frames"])
    member = VIDEO_MEMBER_OF_BUCKET[SampleMeta.from_json_bytes(raw[META]).bucket]  # swap / style drive
    with IndexedVideo(raw[member]) as video:
        driving = video.read(frames)
    face = decode_mask_frames(raw[FACE_MASK], frames)
    foreground = decode_mask_frames(raw[FG_MASK], [int(clip["reference_frame"])])
    return {
        **truth,
        "model_reference": model_pixels(truth["reference"])[0],
        "model_driving": model_pixels(prepare_driving_frames(driving, face, resolution, Jitter())),
        "background_mask": torch.from_numpy(~resize_masks(foreground, resolution)).float(),
    }
