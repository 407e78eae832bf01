"""Is every weights file in place and the right one? Size and sha256, with a cache so a big folder is
hashed once, and trust-on-first-use pins for files whose hash nobody published.

State lives next to the files, in WEIGHTS_DIR/.weights/: hashes.json (sha256 by path, valid while size
and mtime are unchanged) and pins.json (hashes recorded by `weights pin` or by fetch, trust-on-first-use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.weights.manifest import FileSpec, WeightFile, load_weight_specs, members, select

log = logging.getLogger(__name__)

STATE_DIR = ".weights"
TRUST_ON_FIRST_USE = "trust-on-first-use"


class MissingWeights(FileNotFoundError):
    """Every missing or wrong weights file, in one message."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_id(path: Path) -> str:
    """A short sha256 prefix naming the weights file a sample was annotated with."""
    return sha256_file(path)[:12]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically; a read-only weights folder just keeps no state (logged, not fatal)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s (%s); hashes will be recomputed next time", path, exc)


class HashCache:
    """sha256 of files under `root`, reused while a file's (size, mtime_ns) is unchanged. Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STATE_DIR / "hashes.json"
        self.entries: dict[str, dict[str, Any]] = read_json(self.path)
        self.hashed = 0  # files actually read this time (tests and logs)
        self._dirty = False
        self._lock = threading.Lock()

    def sha256(self, rel: str) -> str:
        stat = (self.root / rel).stat()
        with self._lock:
            cached = self.entries.get(rel)
        if cached and cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns:
            return cached["sha256"]
        digest = sha256_file(self.root / rel)
        self.remember(rel, digest)
        with self._lock:
            self.hashed += 1
        return digest

    def remember(self, rel: str, digest: str) -> None:
        stat = (self.root / rel).stat()
        with self._lock:
            self.entries[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            self._dirty = True

    def save(self) -> None:
        with self._lock:
            if self._dirty:
                write_json(self.path, self.entries)
                self._dirty = False


class Pins:
    """Trust-on-first-use hashes of files without a published sha256, by path under WEIGHTS_DIR."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / STATE_DIR / "pins.json"
        self.entries: dict[str, dict[str, Any]] = read_json(self.path)
        self._lock = threading.Lock()

    def get(self, rel: str) -> str | None:
        with self._lock:
            pin = self.entries.get(rel)
        return pin["sha256"] if pin else None

    def record(self, rel: str, digest: str, size: int) -> None:
        with self._lock:
            self.entries[rel] = {
                "sha256": digest,
                "size": size,
                "trust": TRUST_ON_FIRST_USE,
                "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }

    def save(self) -> None:
        with self._lock:
            write_json(self.path, self.entries)


def expected_sha256(spec: FileSpec, pins: Pins) -> tuple[str | None, str]:
    """The hash a file must have and where it comes from (the manifest, or a trust-on-first-use pin)."""
    if spec.sha256:
        return spec.sha256, "published"
    pinned = pins.get(spec.path)
    return (pinned, TRUST_ON_FIRST_USE) if pinned else (None, "")


def file_problem(root: Path, spec: FileSpec, cache: HashCache, pins: Pins, verify_hash: bool = True) -> str:
    """'' when the file is in place and right, else one line saying what is wrong."""
    target = root / spec.path
    if not target.is_file():
        return f"{spec.entry}: missing {target}"
    if not verify_hash:  # presence only (the tiny profile's files have their own sizes)
        return ""
    size = target.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"{spec.entry}: {target} has {size} bytes, expected {spec.size}"
    expected, kind = expected_sha256(spec, pins)
    if expected and cache.sha256(spec.path) != expected:
        return f"{spec.entry}: {target} has the wrong sha256 (expected {expected}, {kind})"
    return ""


def entry_files(specs: dict[str, WeightFile], name: str) -> list[FileSpec]:
    """The files that must be on disk for entry `name` (an archive: its members)."""
    spec = specs[name]
    if spec.kind == "archive":
        return [file for member in members(specs, name) for file in member.file_specs()]
    return spec.file_specs()


def _how_to_get(spec: WeightFile) -> str:
    if spec.manual:
        return f" ({spec.manual})"
    return f" (`weights fetch --for {spec.name}`; origin: {spec.origin})"


def check_weights(
    weights_dir: Path, names: Iterable[str], verify_hash: bool = True, manifest: Path | None = None
) -> list[str]:
    """One line per problem (missing file, wrong size, wrong sha256); empty when everything is in place."""
    root = Path(weights_dir)
    specs = load_weight_specs(manifest)
    cache, pins = HashCache(root), Pins(root)
    problems = []
    seen = set()  # an archive and its members name the same files: report each once
    for name in sorted(set(names)):
        if name not in specs:
            problems.append(f"{name}: not listed in {manifest or 'configs/weights.yaml'}")
            continue
        spec = specs[name]
        files = entry_files(specs, name)
        if not files:  # a folder the manifest does not itemise: presence only
            if not (root / spec.path).exists():
                problems.append(f"{name}: missing {root / spec.path}{_how_to_get(spec)}")
            continue
        for file in files:
            if file.path in seen:
                continue
            seen.add(file.path)
            problem = file_problem(root, file, cache, pins, verify_hash)
            if problem.startswith(f"{file.entry}: missing"):
                problem += _how_to_get(specs[file.entry])
            if problem:
                problems.append(problem)
    cache.save()
    return problems


def require_weights(
    weights_dir: Path, names: Iterable[str], verify_hash: bool = True, manifest: Path | None = None
) -> None:
    """Raise one MissingWeights listing every missing or wrong file."""
    problems = check_weights(weights_dir, names, verify_hash, manifest)
    if problems:
        specs = load_weight_specs(manifest)
        groups = group_by_entry(problems)
        raise MissingWeights(
            f"{len(problems)} weights file(s) missing or wrong under {weights_dir}, by manifest entry:\n  "
            + "\n  ".join(_group_lines(groups, specs))
            + f"\nFetch and verify them: {fetch_command(weights_dir, [specs[n] for n in groups if n in specs])}"
        )


def group_by_entry(problems: list[str]) -> dict[str, list[str]]:
    """{entry: its problems without the 'entry: ' prefix}, in the order met."""
    groups: dict[str, list[str]] = {}
    for problem in problems:
        entry, _, rest = problem.partition(": ")
        groups.setdefault(entry, []).append(rest)
    return groups


def _group_lines(groups: dict[str, list[str]], specs: dict[str, WeightFile]) -> list[str]:
    """One line per entry with one problem; else a header (with the entry's how-to-get, once) and a line
    per file."""
    lines = []
    for entry, items in groups.items():
        if len(items) == 1:
            lines.append(f"{entry}: {items[0]}")
            continue
        hint = _how_to_get(specs[entry]) if entry in specs else ""
        files = [item.removesuffix(hint) if hint else item for item in items]
        lines.append(f"{entry} ({len(items)} files){hint}:" + "".join(f"\n    {item}" for item in files))
    return lines


def fetch_command(weights_dir: Path, entries: list[WeightFile]) -> str:
    """The `weights fetch` command that gets `entries`: `--for` the job they all serve (build, train,
    eval) or their names, and `--accept-licence` for each restricted one."""
    common = set.intersection(*(set(e.jobs) for e in entries)) if entries else set()
    wanted = next((job for job in ("build", "train", "eval") if job in common), None)
    words = [wanted] if wanted else [e.name for e in entries]
    command = f"python -m pipeline weights fetch --for {' '.join(words)} --weights-dir {weights_dir}"
    restricted = [entry.name for entry in entries if entry.restricted]
    for name in restricted:
        command += f" --accept-licence {name}"
    if restricted:
        command += (
            f" (accepts the non-commercial / research-only licence of {', '.join(restricted)}: read it first)"
        )
    return command


def verify_files(weights_dir: Path, names: Iterable[str], manifest: Path | None = None) -> list[str]:
    """The hash check for code outside the builder (trainer, evaluation): every problem, one per line."""
    return check_weights(Path(weights_dir), names, verify_hash=True, manifest=manifest)


def job_names(job: str, manifest: Path | None = None) -> list[str]:
    """The entries a job (build / train / eval) or stage reads, as `weights fetch --for JOB` selects them."""
    return [spec.name for spec in select(load_weight_specs(manifest), [job]) if job in spec.jobs]


def verify_job(weights_dir: Path, job: str, manifest: Path | None = None) -> list[str]:
    """Every problem with the files a job reads: the trainer calls it with "train", evaluation with
    "eval" (each problem one line; empty when all are present with the right size and sha256)."""
    return verify_files(weights_dir, job_names(job, manifest), manifest)


def unpinned(weights_dir: Path, names: Iterable[str], manifest: Path | None = None) -> list[str]:
    """Present files that have neither a published hash nor a pin: nothing protects them yet."""
    root = Path(weights_dir)
    specs = load_weight_specs(manifest)
    pins = Pins(root)
    return [
        file.path
        for name in sorted(set(names) & set(specs))
        for file in entry_files(specs, name)
        if (root / file.path).is_file() and expected_sha256(file, pins)[0] is None
    ]


def pin_weights(weights_dir: Path, names: Iterable[str], manifest: Path | None = None) -> dict[str, str]:
    """Record the sha256 of every present file without a published hash (trust on first use)."""
    root = Path(weights_dir)
    specs = load_weight_specs(manifest)
    cache, pins = HashCache(root), Pins(root)
    pinned = {}
    for name in sorted(set(names)):
        if name not in specs:
            raise ValueError(f"{name}: not listed in {manifest or 'configs/weights.yaml'}")
        for file in entry_files(specs, name):
            target = root / file.path
            if file.sha256 or not target.is_file():
                continue
            digest = cache.sha256(file.path)
            old = pins.get(file.path)
            if old and old != digest:
                log.warning("%s: re-pinning %s (was %s, now %s)", name, file.path, old, digest)
            pins.record(file.path, digest, target.stat().st_size)
            pinned[file.path] = digest
    pins.save()
    cache.save()
    return pinned
