"""The `tiny` profile: every model written in its real on-disk format with random weights (no download,
ever), and which folder each profile reads. Stage modules register a tiny writer per weights name; the
same loader then reads tiny and real files."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.weights.check import MissingWeights
from pipeline.weights.manifest import load_weight_specs

log = logging.getLogger(__name__)

PROFILES = ("tiny", "full")
DEFAULT_TINY_DIR = (
    Path(os.environ.get("MEGACTOR_CACHE", Path.home() / ".cache" / "megactor")) / "tiny_weights"
)

TinyWriter = Callable[[Path, int], None]  # (destination path, seed) -> writes the file or folder
TINY_WRITERS: dict[str, TinyWriter] = {}


def register_tiny_writer(name: str) -> Callable[[TinyWriter], TinyWriter]:
    """Decorator: `fn(dest, seed)` writes weights file `name` in its real format with random weights."""

    def register(fn: TinyWriter) -> TinyWriter:
        TINY_WRITERS[name] = fn
        return fn

    return register


def ensure_tiny_weights(weights_dir: Path, names: Iterable[str], seed: int = 0) -> Path:
    """Write the tiny version of every named file that is not there yet (each atomically)."""
    specs = load_weight_specs()
    for name in sorted(set(names)):
        target = weights_dir / specs[name].path
        if target.exists():
            continue
        if name not in TINY_WRITERS:
            raise KeyError(f"no tiny writer registered for weights {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        log.info("writing tiny random weights %s -> %s", name, target)
        try:
            TINY_WRITERS[name](tmp, seed)
            os.replace(tmp, target)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
    return weights_dir


def resolve_weights_dir(profile: str, weights_dir: str | None) -> Path:
    """tiny: the given folder or the cache; full: the given folder or $WEIGHTS_DIR."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if profile == "tiny":
        return Path(weights_dir) if weights_dir else DEFAULT_TINY_DIR
    chosen = weights_dir or os.environ.get("WEIGHTS_DIR")
    if not chosen:
        raise MissingWeights("the full profile needs weights_dir=... or the WEIGHTS_DIR environment variable")
    return Path(chosen)
