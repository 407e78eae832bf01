"""`python -m evaluation run`: generate self- and cross-reenactment videos for held-out clips of a shard
set with a checkpoint's sampling pipeline (seeded), score them, write metrics.json, frames.parquet,
results.md and side-by-side videos (reference | driving | generated | ground truth).

Clips: the first `num_clips` usable samples of the split in sorted shard order (train.data.fixed_batch:
frames and reference drawn from Random(seed), no jitter), so two checkpoints see the same clips.
Self reenactment: clip i's reference and driving, scored against clip i. Cross reenactment: clip
(i+1)'s reference driven by clip i; no ground truth, so CSIM against clip (i+1)'s reference and identity
leakage against clip i's own identity. Generation runs in this process, one clip after another (no Ray).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from evaluation.outputs import markdown_table, write_metrics
from evaluation.scoring import Evaluator
from model.loading import load_megactor
from model.megactor import MegActor
from model.preprocess import to_uint8_frames
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline.video import encode_mp4
from pipeline.writer import atomic_write_bytes

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

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.num_frames < 1 or self.steps < 1:
            raise ValueError("num_clips, num_frames and steps must be >= 1")
        if self.cross and self.num_clips < 2:
            raise ValueError("cross reenactment needs --num-clips >= 2 (another clip's reference)")


def load_for_eval(checkpoint: Path, model_weights_dir: str | None = None) -> tuple[MegActor, dict[str, Any]]:
    """The model a checkpoint holds (a run folder, a training checkpoint or a MegActor checkpoint), its
    pretrained components from the run's own model section (train_config.json), else model_weights_dir
    or $WEIGHTS_DIR; returns the model and the run's training config (empty without one)."""
    from train.loop import CONFIG_FILE, MODEL_DIR, resolve_init_checkpoint

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
    evaluator = Evaluator(weights_dir or os.environ.get("WEIGHTS_DIR") or None, backend, device)
    settings = {"self": [(i, i) for i in range(count)]}
    if options.cross:
        settings["cross"] = [((i + 1) % count, i) for i in range(count)]
    summaries, tables = {}, []
    for setting, pairs in settings.items():
        scores = []
        for k, (ref, drv) in enumerate(pairs):
            generated = generate(model, batch, ref, drv, options)
            reference = to_uint8_frames(batch["reference"][ref][None])
            driving_real = to_uint8_frames(batch["target"][drv])  # the driving clip's own frames
            target = driving_real if setting == "self" else None
            clip = f"{setting}:{keys[ref]}<-{keys[drv]}" if setting == "cross" else f"self:{keys[drv]}"
            scores.append(evaluator.score_clip(generated, target, reference, driving_real, clip=clip))
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
    write_metrics(out, summary, pd.concat(tables, ignore_index=True))
    atomic_write_bytes(out / "results.md", (
        f"# Evaluation of {run['megactor_dir']}\n\n{count} held-out clips of {shards} ({options.split}), "
        f"{options.num_frames} frames at {resolution}², {options.steps} DDIM steps, seed {options.seed}, "
        f"backend {backend}.\n\n{table}"
    ).encode())  # fmt: skip
    return table
