"""How far a resume from bf16-stored AdamW moments strays from the uninterrupted run, JSON.

    python benchmarks/resume_moments.py [--save-at 10] [--steps 30]

Tiny model on CPU, stage 1, fp32 (no autocast), random batches. For each checkpoint_moments (fp32, the
baseline, and bf16, the default) in the same run: train `--save-at` steps, save a training checkpoint,
load it into a fresh model and optimiser, then train both the original and the resumed copy `--steps`
more steps on the same batches and noise. Reported: the distance between the two runs' trainable weights
relative to how far the weights moved over those steps, and the largest relative difference of a step's
loss. fp32 moments must read exactly 0 (a resume restores every bit).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.loading import build_megactor, write_tiny_weights  # noqa: E402
from model.megactor import MegActorBatch  # noqa: E402
from train.checkpoint import (  # noqa: E402
    load_training_model,
    load_training_state,
    save_training_checkpoint,
)
from train.config import TrainConfig, load_train_config  # noqa: E402
from train.loop import TrainState, make_lr_scheduler, make_optimizer, step_generator, train_step  # noqa: E402

TINY = REPO / "configs" / "train" / "tiny.yaml"
CPU = torch.device("cpu")


class Run:
    """A model with its trainable parameters, AdamW and LR schedule, stepped on random batches."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.params = list(model.trainable_parameters(config.stage).values())
        model.train()
        self.optimizer = make_optimizer(self.params, config.optim)
        self.scheduler = make_lr_scheduler(self.optimizer, config.optim.warmup_steps)

    def step(self, step: int) -> float:
        return train_step(self.model, MegActorBatch.random(step), self.optimizer, self.scheduler, self.params,
                          self.config, step_generator(0, 0, step, CPU))["loss"]  # fmt: skip

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.params])


def measure(weights: Path, folder: Path, moments: str, save_at: int, steps: int) -> dict:
    config = load_train_config("stage1", [TINY], ["optim.warmup_steps=4", f"checkpoint_moments={moments}"])
    torch.manual_seed(0)  # the modules built without pretrained weights start alike for both settings
    original = Run(build_megactor(weights, config.megactor_config()), config)
    for step in range(save_at):
        original.step(step)
    save_training_checkpoint(folder, original.model, original.optimizer, original.scheduler,
                             TrainState(step=save_at), config, rank=0)  # fmt: skip
    at_save = original.flat()
    resumed = Run(load_training_model(weights, folder, {}), config)
    load_training_state(resumed.model, resumed.optimizer, resumed.scheduler, folder)
    losses = [(original.step(s), resumed.step(s)) for s in range(save_at, save_at + steps)]
    moved = (original.flat() - at_save).norm()
    apart = (original.flat() - resumed.flat()).norm()
    return {
        "weights_apart_over_change": float(apart / moved),
        "max_relative_loss_difference": max(abs(a - b) / abs(a) for a, b in losses),
        "mean_loss": [sum(a for a, _ in losses) / steps, sum(b for _, b in losses) / steps],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save-at", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report: dict = {"benchmark": "resume_moments", "machine": f"{platform.machine()}, CPU",
                    "torch": torch.__version__, "save_at": args.save_at, "steps_after": args.steps}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="resume-moments-") as tmp:
        weights = write_tiny_weights(Path(tmp) / "weights", seed=0)
        for moments in ("fp32", "bf16"):
            report[moments] = measure(weights, Path(tmp) / moments, moments, args.save_at, args.steps)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
