"""Bytes written and seconds the step loop is blocked per training checkpoint save, before and after, JSON.

    python benchmarks/checkpoint_save.py [--saves 3] [--before-ref REF]

Tiny model on CPU, stage 1, EMA on, one AdamW step taken. In the same run:

    before  the trainer's save as of REF (default: the parent of the commit that added train/checkpoint.py),
            loaded from git: the full state gathered, written into a TemporaryDirectory, then copied into
            storage as ray.train.report(Checkpoint.from_directory(tmp)) does; the loop waits for all of it
    after   train.checkpoint.Checkpointer: DCP of the trainable weights, AdamW state and EMA written by a
            thread straight into storage (the loop waits for the host copy), model/ exported when due

Plus the same arithmetic for the full-size model (SD1.5 ReferenceNet + AnimateDiff denoiser + CLIP + VAE),
counted on the `meta` device: parameters by module, trainable per stage, bytes per save.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.components import build_components  # noqa: E402
from model.config import MegActorConfig  # noqa: E402
from model.loading import SAVED_MODULES, build_megactor, write_tiny_weights  # noqa: E402
from model.megactor import MegActor  # noqa: E402
from train.checkpoint import MOMENT_DTYPES, Checkpointer  # noqa: E402
from train.config import load_train_config  # noqa: E402
from train.ema import make_ema  # noqa: E402
from train.loop import TrainState, make_lr_scheduler, make_optimizer  # noqa: E402

GB = 1e9
TINY = REPO / "configs" / "train" / "tiny.yaml"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def before_module(ref: str | None) -> tuple[str, ModuleType]:
    """train/loop.py as of `ref`, importable beside today's packages (model/, train.ema, train.config)."""
    git = ["git", "-C", str(REPO)]
    if ref is None:
        added = subprocess.run([*git, "log", "--diff-filter=A", "--format=%H", "--", "train/checkpoint.py"],
                               capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        if not added:
            raise SystemExit("no commit adds train/checkpoint.py: pass --before-ref")
        ref = f"{added[-1]}^"
    commit = subprocess.run([*git, "rev-parse", "--short", ref], capture_output=True, text=True, check=True)
    source = subprocess.run(
        [*git, "show", f"{ref}:train/loop.py"], capture_output=True, text=True, check=True
    )
    path = Path(tempfile.mkdtemp(prefix="loop-before-")) / "loop_before.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("loop_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return commit.stdout.strip(), module


def tiny_run(weights: Path):
    config = load_train_config("stage1", [TINY], ["ema.enabled=true", "max_steps=1000"])
    torch.manual_seed(0)
    model = build_megactor(weights, config.megactor_config())
    params = list(model.trainable_parameters("stage1").values())
    optimizer = make_optimizer(params, config.optim)
    scheduler = make_lr_scheduler(optimizer, 0)
    ema = make_ema(params, config.ema)
    for param in params:  # one AdamW step: the moments exist, as in any save after the first step
        param.grad = torch.full_like(param, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.step(params)
    return config, model, params, optimizer, scheduler, ema


def save_before(loop, storage: Path, step: int, run) -> tuple[float, int]:
    config, model, _, optimizer, scheduler, ema = run
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        loop.save_training_checkpoint(
            Path(tmp), model, optimizer, scheduler, TrainState(step=step), config, 0, ema
        )
        written = folder_bytes(Path(tmp))
        shutil.copytree(tmp, storage / f"checkpoint_{step:07d}")  # Ray's upload into storage_path
    return time.perf_counter() - started, 2 * written


def save_after(storage: Path, step: int, run, checkpointer: Checkpointer) -> tuple[float, float, int]:
    _, model, _, optimizer, scheduler, ema = run
    location = storage / f"checkpoint_{step:07d}"
    started = time.perf_counter()
    blocked = checkpointer.save(str(location), model, optimizer, scheduler, TrainState(step=step), ema)
    checkpointer.wait()
    return blocked, time.perf_counter() - started, folder_bytes(location)


def full_model_arithmetic() -> dict:
    """Parameter counts of the full-size model by module and bytes per save, before and after."""
    with torch.device("meta"):
        model = MegActor(MegActorConfig(), build_components("full"))
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    counts = {k: v for k, v in counts.items() if v}
    motion = sum(p.numel() for n, p in model.named_parameters() if "motion_modules" in n)
    saved = sum(p.numel() for n, p in model.named_parameters() if n.startswith(SAVED_MODULES))
    total = sum(counts.values())
    out = {
        "parameters": {**counts, "denoiser.motion_modules": motion, "total": total, "saved_modules": saved}
    }
    for stage in ("stage1", "stage2"):
        trained = sum(p.numel() for p in model.trainable_parameters(stage).values())
        fp32 = 4
        moment = MOMENT_DTYPES[load_train_config(stage).checkpoint_moments].itemsize
        export = saved * fp32
        before = export + 2 * trained * fp32  # model/ + optimizer.pt
        before_ema = before + trained * fp32  # + train_weights.safetensors
        after = trained * (fp32 + 2 * moment)  # DCP: weights + 2 AdamW moments (the stage's dtype)
        after_ema = after + trained * fp32  # + EMA
        out[stage] = {
            "trainable_parameters": trained,
            "frozen_parameters": total - trained,
            "gathered_on_rank0_gb_before": round((total + 2 * trained) * fp32 / GB, 2),
            "moment_bytes_after": moment,
            "bytes_per_save_gb": {
                "before": round(2 * before / GB, 2),  # into /tmp, then copied into storage
                "before_ema": round(2 * before_ema / GB, 2),
                "after_with_export": round((after + export) / GB, 2),
                "after_ema_with_export": round((after_ema + export) / GB, 2),
                "after_without_export": round(after / GB, 2),
                "after_ema_without_export": round(after_ema / GB, 2),
            },
            "tmp_bytes_gb_before_ema": round(before_ema / GB, 2),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--before-ref", default=None, help="git ref of the code path to compare with")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    commit, loop = before_module(args.before_ref)
    with tempfile.TemporaryDirectory(prefix="checkpoint-save-") as tmp:
        base = Path(tmp)
        run = tiny_run(write_tiny_weights(base / "weights", seed=0))
        rows: dict[str, list] = {"before": [], "after_export": [], "after_no_export": [],
                                 "after_no_export_fp32_moments": []}  # fmt: skip
        variants = (("after_export", 0, "bf16"), ("after_no_export", 10**6, "bf16"),
                    ("after_no_export_fp32_moments", 10**6, "fp32"))  # fmt: skip
        for index in range(args.saves):
            rows["before"].append(save_before(loop, base / "before", index + 1, run))
            for key, every, moments in variants:
                run[0].export_every, run[0].checkpoint_moments = every, moments
                checkpointer = Checkpointer(run[0], rank=0)
                rows[key].append(save_after(base / key, index + 1, run, checkpointer))
                checkpointer.close()
    trainable = sum(p.numel() for p in run[2])

    def summary(key: str) -> dict:
        values = rows[key]
        if key == "before":
            return {
                "blocked_s": round(statistics.median(v[0] for v in values), 4),
                "bytes_written": values[0][1],
            }
        return {"blocked_s": round(statistics.median(v[0] for v in values), 4),
                "until_complete_s": round(statistics.median(v[1] for v in values), 4),
                "bytes_written": values[0][2]}  # fmt: skip

    tiny = {key: summary(key) for key in rows}
    for key in ("after_export", "after_no_export", "after_no_export_fp32_moments"):
        tiny[key]["bytes_ratio"] = round(tiny[key]["bytes_written"] / tiny["before"]["bytes_written"], 3)
        tiny[key]["blocked_ratio"] = round(tiny[key]["blocked_s"] / tiny["before"]["blocked_s"], 3)
    print(json.dumps({
        "benchmark": "checkpoint_save",
        "before_ref": commit,
        "torch": torch.__version__,
        "saves": args.saves,
        "tiny_cpu": {"trainable_parameters": trainable, **tiny},
        "full_model": full_model_arithmetic(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
