"""The learning check: train the tiny model on the demo's talking heads on CPU, in-process, and show with
the conditioning diagnostics that it uses the driving video and the reference.

    python -m train.learning_check --shards out/learning-check/data --out out/learning-check

The shards are the demo built with configs/data/learning-check.yaml (`make learning-check` builds them),
where the answer is known: the driving video (the face box in grayscale) carries pose, eyes and mouth;
every clip has its own colours, so colour, hair and background come only from the reference frame. The
check writes diagnostics.json with the initial and the trained model's numbers and exits 1 unless the
trained model's driving gain and reference gain both exceed MIN_TRAINED_GAIN while the initial model's
stay within MAX_INITIAL_GAIN of 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.loading import build_megactor, ensure_tiny_weights
from model.megactor import MegActor
from train.config import CONFIG_DIR, TrainConfig, load_train_config
from train.data import DataConfig, fixed_batch, make_loader
from train.diagnose import diagnose, shard_folder, write_result
from train.diagnostics import DiagnosticsSettings
from train.loop import make_lr_scheduler, make_optimizer, step_generator, to_model_batch, train_step

log = logging.getLogger("train.learning_check")

CPU = torch.device("cpu")
CUTS = ("driving", "reference")
DRIVING_GAIN = "gain_driving_shuffled"
# Another clip's reference frame, by every path it takes: in the tiny model after a few hundred steps the
# concatenated reference latent carries it and reference attention (gain_reference_dropped) stays ~0.
REFERENCE_GAIN = "gain_reference_shuffled"
# Measured (docs/training.md): trained gains 0.100-0.368 over seeds 0-2, exactly 0 for a cut path; untrained
# |gain| < 1e-3 (the driving ones exactly 0). The bar is half the smallest healthy gain.
MIN_TRAINED_GAIN = 0.05
MAX_INITIAL_GAIN = 0.02
DEFAULT_STEPS = 600
# The check's training: the tiny overlay, a higher rate so a few hundred CPU steps learn the conditions.
# The reference is the trainer's default (any frame of the segment): with a frame of the sampled window
# the reference already shows the targets' pose and the driving gain after 600 steps varied 0.05-0.26
# over seeds.
OVERRIDES = (
    "optim.lr=1e-3",
    "data.batch_size=2",
    "data.num_frames=4",
    "data.reference=segment",
    "data.resolution=64",
    "data.num_workers=0",
    "model.config.reference_dropout=0.1",
)


def check_config(shards: Path, steps: int, extra: list[str] | None = None, seed: int = 0) -> TrainConfig:
    """The tiny stage-1 config on the shards' train split, `steps` steps in one data epoch."""
    overrides = [*OVERRIDES, f"data.root={shards.resolve()}", f"data.shards={shard_folder(shards).resolve()}",
                 f"data.steps_per_epoch={steps}", f"max_steps={steps}", f"seed={seed}"]  # fmt: skip
    return load_train_config("stage1", [CONFIG_DIR / "tiny.yaml"], [*overrides, *(extra or [])])


@contextlib.contextmanager
def cut_paths(model: MegActor, cuts: tuple[str, ...]) -> Iterator[None]:
    """A dead condition path, as a bug would leave it: driving = the DrivenEncoder's output times 0;
    reference = the reference frame reaches the denoiser by no path: reference attention never reads the
    bank, its latent's and its background mask's conv_in channels get 0, its CLIP background tokens are 0."""
    unknown = set(cuts) - set(CUTS)
    if unknown:
        raise ValueError(f"cut: expected some of {CUTS}, got {sorted(unknown)}")
    handles = []
    if "driving" in cuts:
        handles.append(model.driven_encoder.register_forward_hook(lambda _m, _i, out: out * 0))
    was = model.bank.enabled
    if "reference" in cuts:
        model.bank.enabled = False
        latent = model.vae.config.latent_channels  # conv_in input: noisy, reference latent, mask, driving

        def no_reference_latent(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            sample = args[0].clone()
            sample[:, latent : 2 * latent + 1] = 0
            return (sample, *args[1:])

        handles.append(model.denoiser.conv_in.register_forward_pre_hook(no_reference_latent))
        handles.append(model.background.register_forward_hook(lambda _m, _i, out: out * 0))
    try:
        yield
    finally:
        model.bank.enabled = was
        for handle in handles:
            handle.remove()


def train(model: MegActor, config: TrainConfig, steps: int) -> list[float]:
    """train/loop.py's step on one CPU rank over the config's loader; returns the step losses."""
    params = list(model.trainable_parameters(config.stage).values())
    model.train()
    optimizer = make_optimizer(params, config.optim)
    scheduler = make_lr_scheduler(optimizer, config.optim.warmup_steps)
    loader = make_loader(config.data, seed=config.seed, epoch=0, rank=0, world_size=1)
    losses: list[float] = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        metrics = train_step(model, to_model_batch(batch, CPU), optimizer, scheduler, params, config,
                             step_generator(config.seed, 0, step, CPU))  # fmt: skip
        losses.append(metrics["loss"])
        if (step + 1) % 50 == 0:
            log.info("step %d: loss %.4f", step + 1, sum(losses[-50:]) / 50)
    return losses


def diagnose_model(model: MegActor, config: TrainConfig, split: str, samples: int) -> dict[str, Any]:
    data = dataclasses.replace(config.data, split=split)
    settings = DiagnosticsSettings(seed=0, repeats=config.validation.loss_repeats, t_min=config.validation.cond_t_min,
                                   t_max=config.validation.cond_t_max)  # fmt: skip
    return diagnose(model, data, samples, settings, CPU)


def verdict(initial: dict[str, Any], trained: dict[str, Any]) -> list[str]:
    """What fails the check (empty: it passes)."""
    problems = []
    for name in (DRIVING_GAIN, REFERENCE_GAIN):
        if not trained["gains"][name] > MIN_TRAINED_GAIN:
            problems.append(f"trained {name} {trained['gains'][name]:+.4f} <= {MIN_TRAINED_GAIN}")
        if not abs(initial["gains"][name]) < MAX_INITIAL_GAIN:
            problems.append(f"initial {name} {initial['gains'][name]:+.4f}: |gain| >= {MAX_INITIAL_GAIN}")
    return problems


def unit_variance_scale(model: MegActor, data: DataConfig, samples: int) -> float:
    """The VAE scaling factor that gives the check's target latents unit standard deviation, found the way
    Stable Diffusion's 0.18215 was (1 / the std of a batch of training latents). The tiny VAE's random
    weights at SD's factor give latents of std ~0.05: the noise then swamps them and no condition can
    explain more than a fraction of a percent of the loss."""
    batch = fixed_batch(data, samples, allow_fewer=True)
    latents = model.encode_frames(batch["target"]) / model.latent_scale
    return float(1.0 / latents.std())


def run_check(
    shards: Path,
    weights_dir: Path,
    steps: int,
    samples: int = 8,
    split: str = "train",
    cuts: tuple[str, ...] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Initial diagnostics, training, trained diagnostics: the diagnostics.json content."""
    config = check_config(shards, steps, seed=seed)
    torch.manual_seed(config.seed)
    model = build_megactor(weights_dir, config.megactor_config())
    model.latent_scale = unit_variance_scale(model, config.data, samples)
    with cut_paths(model, cuts):
        initial = diagnose_model(model, config, split, samples)
        started = time.perf_counter()
        losses = train(model, config, steps)
        seconds = time.perf_counter() - started
        trained = diagnose_model(model, config, split, samples)
    return {
        "initial": initial,
        "trained": trained,
        "steps": steps,
        "train_seconds": seconds,
        "train_loss_first": sum(losses[:20]) / max(1, len(losses[:20])),
        "train_loss_last": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "cuts": list(cuts),
        "seed": seed,
        "latent_scale": model.latent_scale,
        "thresholds": {
            "min_trained_gain": MIN_TRAINED_GAIN,
            "max_initial_gain": MAX_INITIAL_GAIN,
            "driving": DRIVING_GAIN,
            "reference": REFERENCE_GAIN,
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.learning_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--shards",
        type=Path,
        default=Path("out/learning-check/data"),
        help="OUT of a demo build with configs/data/learning-check.yaml",
    )
    parser.add_argument("--out", type=Path, default=Path("out/learning-check"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--samples", type=int, default=8, help="clips in the diagnostic batch")
    parser.add_argument("--split", default="train", help="split of the diagnostic batch (see --help text)")
    parser.add_argument("--weights-dir", type=Path, default=Path("out/learning-check/tiny_model"))
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and training draws")
    parser.add_argument("--cut", action="append", default=[], choices=CUTS, help="train with this path dead")
    args = parser.parse_args(argv)
    if not (args.shards / "index.parquet").is_file():
        print(f"learning check: no shard build in {args.shards}: `make learning-check` builds it (the demo with "
              "configs/data/learning-check.yaml)")  # fmt: skip
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = ensure_tiny_weights(args.weights_dir)
    result = run_check(args.shards, weights, args.steps, args.samples, args.split, tuple(args.cut), args.seed)
    problems = verdict(result["initial"], result["trained"])
    result["passed"] = not problems
    result["problems"] = problems
    path = write_result(result, args.out)
    for name in ("initial", "trained"):
        gains = " ".join(f"{k[5:]}={v:+.3f}" for k, v in result[name]["gains"].items())
        swap = result[name]["losses"].get("swap_gap")
        print(f"{name}: loss {result[name]['losses']['loss']:.4f} gains {gains}"
              + (f" swap_gap {swap:+.4f}" if swap is not None else ""))  # fmt: skip
    print(f"{path}: {'PASS' if not problems else 'FAIL: ' + '; '.join(problems)} "
          f"({args.steps} steps in {result['train_seconds']:.0f} s)")  # fmt: skip
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
