"""`python -m evaluation run`: generate self- and cross-reenactment videos for held-out clips of a shard
set with a checkpoint's sampling pipeline (seeded), score them, write metrics.json, frames.parquet,
results.md and side-by-side videos (reference | driving | generated | ground truth, labelled).

Clips: a protocol file's (`--protocol FILE`, evaluation/protocol.py), else a protocol made on the fly
from the options: the first `num_clips` usable samples of the split in sorted shard order, every
`stride`-th frame from the clip's first, the clip's first frame as the reference, so two checkpoints
see the same frames. Self reenactment: clip i's reference and driving, scored against clip i. Cross
reenactment: each clip drives the reference of a clip of another identity (the shard index's
`identity`), drawn from Random(seed); the pairs are written to pairs.parquet. No ground truth there, so
no reconstruction metrics and no AKD; CSIM against the reference and identity leakage against the
driver's identity, with its baseline. A clip that cannot be read is a per-clip error in the results,
not a silent skip. Generation runs in this process, one clip after another (no Ray).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.distribution import DEFAULT_PROTOCOL
from evaluation.outputs import label_panels, summarise_setting, write_results
from evaluation.protocol import (
    Benchmark,
    cross_pairs,
    make_benchmark,
    model_inputs,
    shard_samples,
    task_name,
    tasks_of,
)
from evaluation.scoring import PER_PAIR, Evaluator
from model.loading import load_megactor
from model.megactor import MegActor
from model.preprocess import to_uint8_frames
from model.sampling import MegActorPipeline, SamplingConfig
from pipeline.video import encode_mp4
from pipeline.writer import atomic_write_bytes

log = logging.getLogger(__name__)

GRID_FPS = 8.0
GRID_LABELS = ("reference", "driving", "generated", "ground truth")
__all__ = ["RunOptions", "cross_pairs", "evaluate_checkpoint", "load_for_eval", "write_grid"]
# Reading a clip from the shards can fail on its data; anything else is a bug and stops the run.
CLIP_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


@dataclass
class RunOptions:
    num_clips: int = 8
    num_frames: int = 16
    steps: int = 25
    guidance_scale: float = 4.5
    stride: int = 1  # every frame of the source (its own frame rate), as FVD expects
    cross: bool = False
    grid_clips: int = 2
    seed: int = 0
    split: str = "test"
    resolution: int | None = None  # default: the checkpoint's training resolution (else 512)
    protocol: str = DEFAULT_PROTOCOL  # FID / FVD sampling protocol (evaluation/distribution.py)
    reference: str = "first"  # the clip's frame used as the reference (evaluation/protocol.py)

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.num_frames < 1 or self.steps < 1 or self.stride < 1:
            raise ValueError("num_clips, num_frames, stride and steps must be >= 1")
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


def run_benchmark(shards: str, options: RunOptions, resolution: int, backend: str) -> Benchmark:
    """The protocol `run` uses without a protocol file: the options' clips, frames and pairs."""
    benchmark = make_benchmark(
        shards, options.split, options.num_clips, options.num_frames, options.stride, options.reference,
        resolution, options.seed, options.cross, options.protocol, backend,
    )  # fmt: skip
    if options.cross:
        missing = [c["key"] for c in benchmark.clips if not c["identity"]]
        if missing:
            raise ValueError(
                f"cross reenactment pairs clips of different people, but the index parts of {shards} "
                f"({options.split}) give no identity for {missing}: rebuild the shard set (index parts carry `identity`)"
            )
        if not benchmark.cross_pairs:
            cross_pairs([c["identity"] for c in benchmark.clips], options.seed)  # raises, saying why
    return benchmark


def generate(
    model: MegActor, reference: dict[str, Any], driving: dict[str, Any], options: RunOptions
) -> np.ndarray:
    frames = driving["model_driving"].shape[0]
    sampling = SamplingConfig(
        num_inference_steps=options.steps, guidance_scale=options.guidance_scale, seed=options.seed,
        context_frames=min(16, frames), context_overlap=min(8, frames - 1) if frames > 16 else 0, progress=False,
    )  # fmt: skip
    device = next(model.parameters()).device
    video = MegActorPipeline(model)(
        reference["model_reference"].to(device),
        driving["model_driving"].to(device),
        reference["background_mask"].to(device),
        sampling,
    )
    return to_uint8_frames(video.cpu())


def write_grid(path: Path, panels: list[np.ndarray], labels: tuple[str, ...] = GRID_LABELS) -> None:
    """Panels side by side, each labelled with its name; a still (the reference) is repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = min((len(p) for p in panels if len(p) > 1), default=1)
    panels = [np.broadcast_to(p, (count, *p.shape[1:])) if len(p) == 1 else p[:count] for p in panels]
    grid = np.concatenate(label_panels(panels, labels[: len(panels)]), axis=2)
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
    shards: str | None,
    out: Path,
    options: RunOptions,
    backend: str = "insightface",
    weights_dir: str | None = None,
    device: str = "auto",
    model_weights_dir: str | None = None,
    benchmark: Benchmark | None = None,
    protocol_path: str | None = None,
) -> str:
    """Generate, score and write everything under out; returns the Markdown results table. With a
    benchmark (a protocol file's content) its clips, frames, pairs and settings replace the options'."""
    model, run = load_for_eval(checkpoint, model_weights_dir)
    if benchmark is None:
        resolution = options.resolution or int(run.get("data", {}).get("resolution", 512))
        if shards is None:
            raise ValueError("run needs --shards or --protocol")
        benchmark = run_benchmark(shards, options, resolution, backend)
    shards = shards or benchmark.shards
    resolution = benchmark.resolution
    evaluator = Evaluator(
        weights_dir or os.environ.get("WEIGHTS_DIR") or None,
        backend,
        device,
        benchmark.metrics.get("distribution", {}).get("name", options.protocol),
    )
    samples = shard_samples(benchmark, shards)
    clips = {clip["key"]: clip for clip in benchmark.clips}
    identities = {clip["key"]: clip["identity"] for clip in benchmark.clips}
    tasks = tasks_of(benchmark)
    scores: dict[str, list] = {setting: [] for setting, _, _ in tasks}
    errors: dict[str, dict[str, str]] = {setting: {} for setting in scores}
    pair_rows, inputs = [], {}
    grids = dict.fromkeys(scores, 0)

    def clip_inputs(key: str) -> dict[str, Any]:
        if key not in inputs:
            if key not in samples:
                raise KeyError(f"not in the {benchmark.split!r} shards of {shards}")
            inputs.clear()  # one clip's tensors at a time (two in cross pairs)
            inputs[key] = model_inputs(samples[key], clips[key], resolution)
        return inputs[key]

    for number, (setting, ref, drv) in enumerate(tasks, 1):
        name = task_name(setting, ref, drv)
        try:
            reference, driving = clip_inputs(ref), None
            driving = clip_inputs(drv) if drv != ref else reference
            inputs.update({ref: reference, drv: driving})
        except CLIP_ERRORS as exc:
            errors[setting][name] = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            log.warning("clip %d/%d %s: error: %s", number, len(tasks), name, errors[setting][name])
            continue
        generated = generate(model, reference, driving, options)
        target = driving["target"] if setting == "self" else None
        score = evaluator.score_clip(generated, target, reference["reference"], driving["target"], clip=name)
        scores[setting].append(score)
        if setting == "cross":
            pair_rows.append(pair_row(ref, drv, identities, score.pair))
        if grids[setting] < options.grid_clips:
            panels = [reference["reference"], to_uint8_frames(driving["model_driving"]), generated]
            write_grid(
                out / "grids" / f"{setting}_{grids[setting]:02d}.mp4",
                panels + ([target] if target is not None else []),
            )
            grids[setting] += 1
        log.info("clip %d/%d %s: done", number, len(tasks), name)

    summaries = {
        setting: summarise_setting(evaluator, scores[setting], errors[setting]) for setting in scores
    }
    summary = {
        **summaries,
        "checkpoint": run["megactor_dir"],
        "shards": str(shards),
        "split": benchmark.split,
        "clips": benchmark.keys,
        "protocol_file": {"path": protocol_path, "hash": benchmark.hash},
        "options": asdict(options) | {
            "resolution": resolution, "num_frames": benchmark.num_frames, "stride": benchmark.stride,
            "reference": benchmark.reference, "num_clips": len(benchmark.clips),
        },
    }  # fmt: skip
    description = (
        f"{len(benchmark.clips)} held-out clips of {shards} ({benchmark.split}), {benchmark.num_frames} frames "
        f"at stride {benchmark.stride} and {resolution}², reference: the clip's {benchmark.reference} frame, "
        f"{options.steps} DDIM steps, seed {options.seed}, backend {backend}, FID/FVD protocol "
        f"{evaluator.protocol}, protocol hash {benchmark.hash}."
    )
    title = f"Evaluation of {run['megactor_dir']}"
    table = write_results(out, summary, scores, pair_rows, title, description)
    return table
