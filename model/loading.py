"""Build MegActor from a weights folder, and save / load our own checkpoints (safetensors + JSON).

    WEIGHTS_DIR/unet, vae, image_encoder, motion_adapter   pretrained components (see model.components)
    WEIGHTS_DIR/megactor/config.json                       MegActorConfig
    WEIGHTS_DIR/megactor/model.safetensors                 trained ReferenceNet, denoiser, DrivenEncoder

A checkpoint holds only the trained modules; the frozen VAE and CLIP always come from the component
folders. Loading reads tensors and JSON only: nothing is unpickled.

`python -m model.loading tiny OUT_DIR` writes a complete tiny weights folder (components + checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.components import load_components, write_random_components
from model.config import MegActorConfig
from model.megactor import MegActor

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "megactor"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAVED_MODULES = ("reference_net.", "denoiser.", "driven_encoder.")


def build_megactor(weights_dir: str | Path, config: MegActorConfig | None = None) -> MegActor:
    """MegActor freshly assembled from the pretrained components (the start of stage 1)."""
    return MegActor(config or MegActorConfig(), load_components(weights_dir))


def save_checkpoint(
    model: MegActor, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write config.json and model.safetensors (trained modules only) into out_dir.

    state: the model's state dict when it was gathered elsewhere (e.g. from FSDP shards); default
    model.state_dict().
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in (model.state_dict() if state is None else state).items()
        if name.startswith(SAVED_MODULES)
    }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "megactor"})
    model.config.save(out / CONFIG_FILE)
    log.info("saved %d tensors to %s", len(state), out)
    return out


def load_checkpoint(model: MegActor, checkpoint_dir: str | Path) -> MegActor:
    """Load trained weights into a model built with the checkpoint's config; names must match exactly."""
    state = load_file(str(Path(checkpoint_dir) / WEIGHTS_FILE))
    expected = {name for name in model.state_dict() if name.startswith(SAVED_MODULES)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint_dir} does not fit the model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    model.load_state_dict(state, strict=False)
    return model


def load_megactor(
    weights_dir: str | Path, checkpoint_dir: str | Path | None = None, overrides: dict | None = None
) -> MegActor:
    """Components from weights_dir + trained weights from checkpoint_dir (default weights_dir/megactor).

    Without any checkpoint the freshly assembled model is returned, with a warning: its driving and
    reference inputs still have zero weight.
    """
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else Path(weights_dir) / CHECKPOINT_DIR
    has_checkpoint = (checkpoint / CONFIG_FILE).is_file()
    if checkpoint_dir and not has_checkpoint:
        raise FileNotFoundError(f"checkpoint {checkpoint}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    data = MegActorConfig.load(checkpoint / CONFIG_FILE).to_dict() if has_checkpoint else {}
    config = MegActorConfig.from_dict({**data, **(overrides or {})})
    model = build_megactor(weights_dir, config)
    if has_checkpoint:
        load_checkpoint(model, checkpoint)
    else:
        log.warning("no MegActor checkpoint in %s: using the untrained assembly", checkpoint)
    return model


def ensure_tiny_weights(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny weights folder at out_dir, written once: concurrent callers (Ray workers) race safely,
    because each writes a private folder and the first rename wins."""
    out = Path(out_dir)
    if (out / CHECKPOINT_DIR / CONFIG_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_tiny_weights(tmp, seed)
        with contextlib.suppress(OSError):  # another process got there first: use its folder
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (out / CHECKPOINT_DIR / CONFIG_FILE).is_file():
        raise RuntimeError(f"{out}: expected a tiny weights folder after writing it")
    return out


def write_tiny_weights(out_dir: str | Path, seed: int = 0, config: MegActorConfig | None = None) -> Path:
    """A complete tiny weights folder: random components plus a MegActor checkpoint assembled from them."""
    out = write_random_components(out_dir, "tiny", seed)
    torch.manual_seed(seed)
    save_checkpoint(build_megactor(out, config), out / CHECKPOINT_DIR)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.loading", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random-weight weights folder")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_tiny_weights(args.out, args.seed)


if __name__ == "__main__":
    main()
