"""Model weights for the annotators: the `full` profile reads real files under WEIGHTS_DIR, the `tiny`
profile writes every model in its real on-disk format with random weights (no download, ever).

configs/weights.yaml lists each file: its path under the weights folder, sha256 and origin. Stage
modules register a tiny writer per file name; the same loader then reads tiny and real files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

WEIGHTS_YAML = Path(__file__).resolve().parent.parent / "configs" / "weights.yaml"
PROFILES = ("tiny", "full")
DEFAULT_TINY_DIR = (
    Path(os.environ.get("MEGACTOR_CACHE", Path.home() / ".cache" / "megactor")) / "tiny_weights"
)


@dataclass(frozen=True)
class WeightFile:
    name: str  # key in configs/weights.yaml
    path: str  # relative to the weights folder (a file, or a folder for diffusers pipelines)
    sha256: str | None  # of the file; None for folders
    origin: str  # where a user gets the real file


class MissingWeights(FileNotFoundError):
    """Every missing or wrong weights file, in one message."""


def load_weight_specs(path: Path | None = None) -> dict[str, WeightFile]:
    data = yaml.safe_load((path or WEIGHTS_YAML).read_text()) or {}
    return {
        name: WeightFile(name, entry["path"], entry.get("sha256"), entry.get("origin", ""))
        for name, entry in data.items()
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_id(path: Path) -> str:
    """A short sha256 prefix naming the weights file a sample was annotated with."""
    return sha256_file(path)[:12]


def check_weights(weights_dir: Path, names: Iterable[str], verify_hash: bool = True) -> list[str]:
    """One line per problem (missing file, wrong sha256); empty when everything is in place."""
    specs = load_weight_specs()
    problems = []
    for name in sorted(set(names)):
        if name not in specs:
            problems.append(f"{name}: not listed in {WEIGHTS_YAML}")
            continue
        spec = specs[name]
        target = weights_dir / spec.path
        if not target.exists():
            problems.append(f"{name}: missing {target} (get it from {spec.origin})")
        elif verify_hash and spec.sha256 and target.is_file() and sha256_file(target) != spec.sha256:
            problems.append(f"{name}: {target} has the wrong sha256 (expected {spec.sha256})")
    return problems


def require_weights(weights_dir: Path, names: Iterable[str], verify_hash: bool = True) -> None:
    problems = check_weights(weights_dir, names, verify_hash)
    if problems:
        raise MissingWeights(f"{len(problems)} weights file(s) missing or wrong:\n  " + "\n  ".join(problems))


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
