"""Conditioning diagnostics of any checkpoint (train/diagnostics.py) -> DIR/diagnostics.json.

    python -m train.diagnose --checkpoint CKPT --shards OUT --split val --out DIR

CKPT: a run folder (its latest checkpoint), a training checkpoint folder (its exported model/ is read), or
a MegActor checkpoint folder (config.json + model.safetensors). OUT: a shard build's output folder (its shards/ are read) or a folder
of shards. The data settings (resolution, frames, stride) come from the run's train_config.json next to
the checkpoint when there is one, else from --config overlays and key=value overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from model.loading import CONFIG_FILE, WEIGHTS_FILE, ensure_tiny_weights, load_megactor
from model.megactor import MegActor
from pipeline.config import deep_merge, parse_overrides
from pipeline.writer import atomic_write_bytes
from train.checkpoint import MODEL_DIR, latest_checkpoint
from train.config import CONFIG_DIR, TrainConfig, load_train_config
from train.data import DataConfig
from train.diagnostics import DiagnosticsSettings, batch_losses, diagnostic_batch, settings_of

log = logging.getLogger("train.diagnose")

RESULT_FILE = "diagnostics.json"
TRAIN_CONFIG_FILE = "train_config.json"
DEFAULT_TINY_WEIGHTS = Path("out/tiny_model")


def resolve_run(path: Path) -> Path:
    """A run folder (storage_path/name) -> its latest checkpoint holding an exported model/; any other
    path as it is."""
    latest = latest_checkpoint(path, exported=True) if path.is_dir() else None
    return latest if latest is not None else path


def model_folder(checkpoint: Path) -> Path:
    """The exported MegActor folder of a checkpoint (a training checkpoint's model/, or the folder itself)."""
    for candidate in (checkpoint, checkpoint / MODEL_DIR):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"--checkpoint {checkpoint}: expected {CONFIG_FILE} + {WEIGHTS_FILE} in it or in its {MODEL_DIR}/ "
        "(a training checkpoint_* folder or an exported MegActor checkpoint)"
    )


def run_config(checkpoint: Path, overlays: list[str], overrides: list[str]) -> TrainConfig:
    """The run's own train_config.json (next to the checkpoint) when there is one and no --config is
    given, else stage-1 defaults with the overlays; key=value overrides apply either way."""
    for folder in (checkpoint, checkpoint.parent):
        saved = folder / TRAIN_CONFIG_FILE
        if saved.is_file() and not overlays:
            log.info("data and validation settings from %s", saved)
            return TrainConfig.from_dict(
                deep_merge(json.loads(saved.read_text()), parse_overrides(overrides))
            )
    return load_train_config("stage1", overlays, overrides)


def shard_folder(out: Path) -> Path:
    """A build output folder -> its shards/; a folder of .tar shards as it is."""
    return out / "shards" if (out / "shards").is_dir() else out


def weights_folder(given: str | None) -> Path:
    """--weights-dir, else $WEIGHTS_DIR, else the tiny random components `make train-demo` trains on."""
    chosen = given or os.environ.get("WEIGHTS_DIR")
    if chosen:
        return Path(chosen)
    from train.ray_train import TINY_MODEL_DIR  # imports Ray: only when the tiny folder is wanted

    log.info("no --weights-dir or $WEIGHTS_DIR: using the tiny components in %s", TINY_MODEL_DIR)
    return ensure_tiny_weights(TINY_MODEL_DIR)


def diagnose(
    model: MegActor, data: DataConfig, samples: int, settings: DiagnosticsSettings, device: torch.device
) -> dict[str, Any]:
    """Losses and gains on the first `samples` usable clips of `data`, with what they were measured on."""
    batch = diagnostic_batch(data, samples, seed=settings.seed)
    model.to(device)
    losses = batch_losses(model, batch, settings, device)
    gains = {k: v for k, v in losses.items() if k.startswith("gain_")}
    return {
        "losses": {k: v for k, v in losses.items() if not k.startswith("gain_")},
        "gains": gains,
        "keys": list(batch["key"]),
        "buckets": list(batch["bucket"]),
        "timestep_range": [settings.t_min, settings.t_max],
        "repeats": settings.repeats,
        "seed": settings.seed,
        "split": data.split,
        "shards": data.shards,
        "resolution": data.resolution,
        "num_frames": data.num_frames,
    }


def write_result(result: dict[str, Any], out_dir: Path, name: str = RESULT_FILE) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="training or MegActor checkpoint folder"
    )
    parser.add_argument(
        "--shards", type=Path, required=True, help="shard build output (or a folder of shards)"
    )
    parser.add_argument("--split", default="val", help="the shards' split to read (default val)")
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {RESULT_FILE}")
    parser.add_argument(
        "--samples", type=int, default=None, help="clips in the batch (validation.cond_samples)"
    )
    parser.add_argument(
        "--weights-dir", default=None, help="pretrained components (default $WEIGHTS_DIR, else tiny)"
    )
    parser.add_argument(
        "--config", action="append", default=[], help=f"overlay YAML (e.g. {CONFIG_DIR}/tiny.yaml)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "overrides", nargs="*", help="key=value train-config overrides (data.*, validation.*)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    checkpoint = resolve_run(args.checkpoint)
    folder = model_folder(checkpoint)
    config = run_config(checkpoint, args.config, args.overrides)
    data = dataclasses.replace(config.data, shards=str(shard_folder(args.shards).resolve()), split=args.split)
    model = load_megactor(weights_folder(args.weights_dir), folder)
    samples = args.samples or config.validation.cond_samples
    result = {
        "checkpoint": str(folder),
        **diagnose(model, data, samples, settings_of(config), torch.device(args.device)),
    }
    path = write_result(result, args.out)
    gains = " ".join(f"{k}={v:+.3f}" for k, v in result["gains"].items())
    print(f"{path}: loss {result['losses']['loss']:.4f} {gains}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
