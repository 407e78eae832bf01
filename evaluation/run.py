"""`python -m evaluation run`: generate self- and cross-reenactment videos for held-out clips of a shard
set with a checkpoint's sampling pipeline (seeded), score them, write metrics.json, frames.parquet,
results.md and side-by-side videos (reference | driving | generated | ground truth).

Clips: the first `num_clips` usable samples of the split in sorted shard order (train.data.fixed_batch:
frames and reference drawn from Random(seed), no jitter), so two checkpoints see the same clips.
Self reenactment: clip i's reference and driving, scored against clip i. Cross reenactment: each clip
i drives the reference of a clip of another identity (the shard index's `identity`), drawn from
Random(seed) among those clips; the pairs are written to pairs.parquet. No ground truth there, so no
reconstruction metrics and no AKD; CSIM against the reference and identity leakage against clip i's own
identity, with its baseline. Generation runs in this process, one clip after another (no Ray).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from evaluation.distribution import DEFAULT_PROTOCOL
from evaluation.outputs import markdown_table, write_metrics
from evaluation.scoring import PER_PAIR, Evaluator
from model.loading import load_megactor
from model.megactor import MegActor
from model.preprocess import to_uint8_frames
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline import storage
from pipeline.video import encode_mp4
from pipeline.writer import INDEX_SUFFIX, atomic_write_bytes, atomic_write_parquet, read_parquet

log = logging.getLogger(__name__)

GRID_FPS = 8.0


@dataclass
class RunOptions:
    num_clips: int = 8
    num_frames: int = 16
    steps: int = 25
    guidance_scale: float = 4.5
    stride: int = 2
    cross: bool = False
    grid_clips: int = 2
    seed: int = 0
    split: str = "test"
    resolution: int | None = None  # default: the checkpoint's training resolution (else 512)
    protocol: str = DEFAULT_PROTOCOL  # FID / FVD sampling protocol (evaluation/distribution.py)

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.num_frames < 1 or self.steps < 1:
            raise ValueError("num_clips, num_frames and steps must be >= 1")
        if self.cross and self.num_clips < 2:
            raise ValueError("cross reenactment needs --num-clips >= 2 (another clip's reference)")


def load_for_eval(checkpoint: Path, model_weights_dir: str | None = None) -> tuple[MegActor, dict[str, Any]]:
    """The model a checkpoint holds (a run folder, a training checkpoint or a MegActor checkpoint), its
    pretrained components from the run's own model section (train_config.json), else model_weights_dir
    or $WEIGHTS_DIR; returns the model and the run's training config (empty without one)."""
    from train.checkpoint import CONFIG_FILE, MODEL_DIR, resolve_init_checkpoint

    megactor_dir = resolve_init_checkpoint(str(checkpoint), "")
    train_config_path = megactor_dir.parent / CONFIG_FILE if megactor_dir.name == MODEL_DIR else None
    train_config = (
        json.loads(train_config_path.read_text()) if train_config_path and train_config_path.is_file() else {}
    )
    components = model_weights_dir
    if components is None and train_config:
        from train.config import ModelSection
        from train.ray_train import model_weights_dir as run_weights_dir

        section = train_config.get("model", {})
        components = str(run_weights_dir(ModelSection(profile=section.get("profile", "full"),
                                                      weights_dir=section.get("weights_dir"))))  # fmt: skip
    components = components or os.environ.get("WEIGHTS_DIR")
    if not components:
        raise FileNotFoundError(
            f"{checkpoint}: no train_config.json names its components: pass --model-weights-dir or set WEIGHTS_DIR"
        )
    model = load_megactor(components, megactor_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), {
        **train_config,
        "megactor_dir": str(megactor_dir),
        "components": components,
    }


def held_out_clips(shards: str, options: RunOptions, resolution: int) -> dict[str, Any]:
    from train.data import DataConfig, fixed_batch

    config = DataConfig(
        root=str(shards), split=options.split, num_frames=options.num_frames, stride=options.stride,
        resolution=resolution, num_workers=0, scale_jitter=[1.0, 1.0], aspect_jitter=[1.0, 1.0],
    )  # fmt: skip
    return fixed_batch(config, options.num_clips, options.seed, allow_fewer=True)


def clip_identities(shards: str, split: str, keys: list[str]) -> dict[str, str]:
    """Each clip's identity from the index parts beside the split's committed shards."""
    from train.data import DataConfig, list_shards

    found: dict[str, str] = {}
    for tar in list_shards(DataConfig(root=str(shards), split=split, num_workers=0)):
        part = tar[: -len(".tar")] + INDEX_SUFFIX
        if storage.is_file(part):
            index = read_parquet(part, "rebuild the shard set: its index parts name each clip's identity")
            if {"key", "identity"} <= set(index.columns):
                found.update(zip(index["key"].astype(str), index["identity"].astype(str), strict=True))
    missing = [k for k in keys if not found.get(k)]
    if missing:
        raise ValueError(
            f"cross reenactment pairs clips of different people, but the index parts of {shards} ({split}) "
            f"give no identity for {missing}: rebuild the shard set (index parts carry `identity`)"
        )
    return {k: found[k] for k in keys}


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


def generate(
    model: MegActor, batch: dict[str, Any], reference: int, driving: int, options: RunOptions
) -> np.ndarray:
    frames = batch["driving"].shape[1]
    sampling = SamplingConfig(
        num_inference_steps=options.steps, guidance_scale=options.guidance_scale, seed=options.seed,
        context_frames=min(16, frames), context_overlap=min(8, frames - 1) if frames > 16 else 0, progress=False,
    )  # fmt: skip
    video = MegActorPipeline(model)(
        batch["reference"][reference],
        batch["driving"][driving],
        batch["background_mask"][reference],
        sampling,
    )
    return to_uint8_frames(video.cpu())


def write_grid(path: Path, panels: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = min((len(p) for p in panels if len(p) > 1), default=1)  # a still (the reference) is repeated
    grid = np.concatenate(
        [np.broadcast_to(p, (count, *p.shape[1:])) if len(p) == 1 else p[:count] for p in panels], axis=2
    )
    atomic_write_bytes(path, encode_mp4(np.ascontiguousarray(grid), GRID_FPS))


def pair_row(reference: str, driving: str, identities: dict[str, str], pair: dict[str, float]) -> dict:
    """One row of pairs.parquet: who drove whom, and the pair's identity-leakage baseline."""
    return {
        "reference_clip": reference,
        "reference_identity": identities[reference],
        "driving_clip": driving,
        "driving_identity": identities[driving],
        **{name: pair.get(name, float("nan")) for name in PER_PAIR},
    }


def evaluate_checkpoint(
    checkpoint: Path,
    shards: str,
    out: Path,
    options: RunOptions,
    backend: str = "insightface",
    weights_dir: str | None = None,
    device: str = "auto",
    model_weights_dir: str | None = None,
) -> str:
    """Generate, score and write everything under out; returns the Markdown results table."""
    model, run = load_for_eval(checkpoint, model_weights_dir)
    resolution = options.resolution or int(run.get("data", {}).get("resolution", 512))
    batch = held_out_clips(shards, options, resolution)
    keys = list(batch["key"])
    count = len(keys)
    if options.cross and count < 2:
        raise ValueError(f"cross reenactment needs 2 held-out clips, the {options.split!r} split has {count}")
    evaluator = Evaluator(
        weights_dir or os.environ.get("WEIGHTS_DIR") or None, backend, device, options.protocol
    )
    settings = {"self": [(i, i) for i in range(count)]}
    identities: dict[str, str] = {}
    if options.cross:
        identities = clip_identities(shards, options.split, keys)
        settings["cross"] = cross_pairs([identities[k] for k in keys], options.seed)
    summaries, tables, pair_rows = {}, [], []
    for setting, pairs in settings.items():
        scores = []
        for k, (ref, drv) in enumerate(pairs):
            generated = generate(model, batch, ref, drv, options)
            reference = to_uint8_frames(batch["reference"][ref][None])
            driving_real = to_uint8_frames(batch["target"][drv])  # the driving clip's own frames
            target = driving_real if setting == "self" else None
            clip = f"{setting}:{keys[ref]}<-{keys[drv]}" if setting == "cross" else f"self:{keys[drv]}"
            scores.append(evaluator.score_clip(generated, target, reference, driving_real, clip=clip))
            if setting == "cross":
                pair_rows.append(pair_row(keys[ref], keys[drv], identities, scores[-1].pair))
            if k < options.grid_clips:
                panels = [reference, to_uint8_frames(batch["driving"][drv]), generated]
                panels += [driving_real] if target is not None else []
                write_grid(out / "grids" / f"{setting}_{k:02d}.mp4", panels)
        summaries[setting] = evaluator.summarise(scores)
        tables.append(pd.concat([s.frames for s in scores]).assign(setting=setting))
    summary = {
        **summaries,
        "checkpoint": run["megactor_dir"],
        "shards": str(shards),
        "split": options.split,
        "clips": keys,
        "options": asdict(options) | {"resolution": resolution},
    }
    table = markdown_table(summaries)
    if pair_rows:  # before metrics.json, whose presence says the results are complete
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(out / "pairs.parquet", pd.DataFrame(pair_rows))
    write_metrics(out, summary, pd.concat(tables, ignore_index=True))
    atomic_write_bytes(out / "results.md", (
        f"# Evaluation of {run['megactor_dir']}\n\n{count} held-out clips of {shards} ({options.split}), "
        f"{options.num_frames} frames at {resolution}², {options.steps} DDIM steps, seed {options.seed}, "
        f"backend {backend}, FID/FVD protocol {options.protocol}.\n\n{table}"
    ).encode())  # fmt: skip
    return table
