"""One shard build: scan the source, plan the manifest, run the DAG for what is not built yet, report.

The output is a local folder or an object-store prefix (s3://bucket/prefix; pipeline/storage.py). Output
layout:
    build.json          the recipe (settings that change samples) and the last run's summary
    manifest.parquet    one row per clip segment, with its bucket
    shards/             shard-<hash>.tar, .index.parquet, .stats.json (the commit marker)
    index.parquet       every committed sample (merged index parts)
    failures.parquet    clip_id, dataset, key, stage, error, message of every clip that failed
    .build.lock         the run id of the build that owns the output (the fence)

One build at a time: locally an fcntl lock on .build.lock excludes a second build. An object store has
no lock: a build writes its run id to .build.lock (one PUT) and the newest build owns the prefix; a
writer commits a shard's marker only while the fence still holds its run id, so an older build (or a
worker orphaned by a killed one) stops at its next commit (StaleRun) instead of mixing into a rerun.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import __version__, logs, storage
from pipeline.config import BuildConfig
from pipeline.manifest import build_manifest
from pipeline.sources import ScanResult, SourceError, scan_source
from pipeline.stages import get_stage
from pipeline.weights import ensure_tiny_weights, require_weights, resolve_weights_dir
from pipeline.writer import (
    atomic_write_bytes,
    atomic_write_parquet,
    committed_keys,
    committed_names,
    errno_name,
    format_bytes,
    free_bytes,
    is_disk_full,
    merge_index,
    read_json,
    read_stats,
    remove_uncommitted,
    write_failures,
)

log = logging.getLogger(__name__)

# Settings that change what a sample holds: a rerun with other values would mix two recipes.
LOCK_NAME = ".build.lock"
RECIPE_FIELDS = (
    "dataset", "resolution", "max_frames", "min_frames", "crop_scale", "mix", "seed", "video", "profile", "stages",
    "splits",
)  # fmt: skip


class RecipeMismatch(RuntimeError):
    pass


class DiskFull(RuntimeError):
    """The output's disk (or quota) is full: the build stopped short; a rerun after freeing space finishes it."""

    def __init__(self, path: str, cause: str, not_written: int = 0, failures_saved: bool | None = None):
        self.path, self.cause = path, cause
        self.not_written, self.failures_saved = not_written, failures_saved
        super().__init__(self.line())

    @classmethod
    def from_error(cls, exc: OSError, fallback_path: str) -> DiskFull:
        return cls(str(exc.filename or fallback_path), errno_name(exc))

    def line(self) -> str:
        """One line: which path, how much is free there, what to do."""
        free = format_bytes(free_bytes(self.path))
        text = f"disk full: could not write {self.path} ({self.cause}, {free} free on that filesystem)"
        if self.not_written:
            text += f"; {self.not_written} samples not written"
        if self.failures_saved is True:
            text += " (listed in failures.parquet)"
        elif self.failures_saved is False:
            text += "; failures.parquet could not be written either"
        return text + (
            ". Free space there (or give --out a disk with room) and rerun the same command: committed "
            "shards are kept and only the missing samples are built"
        )


@dataclass
class BuildSummary:
    clips_in: int  # clips the source lists (usable or not)
    segments: int  # samples the manifest plans
    skipped: int  # samples already in committed shards
    written: int  # samples written by this run
    failed_clips: int  # clips with a failure record
    shards_written: int
    shards_total: int
    bytes_written: int
    bytes_total: int
    seconds: float
    failure_fraction: float
    source_counters: dict[str, int] = field(default_factory=dict)  # tolerated source oddities, by name

    def lines(self) -> list[str]:
        return [
            f"clips in {self.clips_in}, samples planned {self.segments}",
            f"samples written {self.written}, already built {self.skipped}, clips failed {self.failed_clips}"
            f" ({100 * self.failure_fraction:.1f} %)",
            f"shards written {self.shards_written} (total {self.shards_total}),"
            f" bytes written {self.bytes_written / 2**20:.1f} MiB (total {self.bytes_total / 2**20:.1f} MiB)",
            f"seconds {self.seconds:.1f}",
        ]


def _recipe(config: BuildConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return {name: data[name] for name in RECIPE_FIELDS}


def _check_recipe(out: str, config: BuildConfig) -> None:
    path = storage.join(out, "build.json")
    if not storage.is_file(path):
        return
    fix = "delete it (it only records the recipe and the last run) or use --overwrite to start over"
    previous = read_json(path, fix).get("recipe", {})
    wanted = _recipe(config)
    changed = {k: (previous.get(k), wanted[k]) for k in wanted if previous.get(k) != wanted[k]}
    if changed and committed_names(storage.join(out, "shards")):
        details = "; ".join(
            f"{k}: built with {old!r}, asked for {new!r}" for k, (old, new) in changed.items()
        )
        raise RecipeMismatch(
            f"{out} was built with another recipe ({details}). Mixing recipes in one shard set would "
            "corrupt it silently: use another --out, or --overwrite to start over."
        )


def _clear_outputs(out: str) -> None:
    from pipeline.select import remove_subset

    storage.delete_tree(storage.join(out, "shards"))
    remove_subset(out)  # a subset of the old shards: stale once they go
    for name in ("index.parquet", "failures.parquet", "manifest.parquet", "identities.parquet", "build.json"):
        storage.delete(storage.join(out, name))


def prepare_stage_weights(config: BuildConfig) -> Path | None:
    """The weights folder of the configured stages: tiny files are written, full ones must all be there
    (one MissingWeights error listing every missing file, before any work starts)."""
    if not config.stages:
        return None
    weights_dir = resolve_weights_dir(config.profile, config.weights_dir)
    names = [name for stage in config.stages for name in get_stage(stage.name).weights_needed(stage.options)]
    if config.profile == "tiny":
        ensure_tiny_weights(weights_dir, names)
    else:
        require_weights(weights_dir, names)
    return weights_dir


def _identity_bank(manifest: pd.DataFrame, config: BuildConfig, out: str, weights_dir: Path | None) -> str:
    """identities.parquet from the whole manifest (not only what is left), so a resumed run draws
    swap sources from the same bank."""
    from pipeline.dag import check_resources, init_ray
    from pipeline.identity_bank import BankPool, build_identity_bank

    (swap,) = [stage for stage in config.stages if stage.name == "swap"]
    bank_path = storage.join(out, "identities.parquet")
    device = swap.options.get("device", "auto")
    # A Ray Data pass on an actor pool with the swap stage's resources (the same models on the same devices).
    pool = BankPool(
        size=swap.pool_size,
        num_cpus=swap.num_cpus,
        num_gpus=swap.num_gpus,
        max_task_retries=swap.max_task_retries,
        lost_row_passes=config.lost_row_passes,
        resource_wait_s=config.resource_wait_s,
    )
    init_ray(config.num_cpus)
    check_resources(config)  # the DAG that follows, before the bank's work: a shortfall stops both
    build_identity_bank(
        manifest, config.resolution, config.crop_scale, weights_dir, bank_path, device=device, pool=pool
    )
    return bank_path


def _failure_rows(failures) -> list[dict[str, str]]:
    return [
        {
            "clip_id": f.clip_id,
            "dataset": f.dataset,
            "key": "",
            "stage": f.stage,
            "error": f.error,
            "message": f.message,
        }
        for f in failures
    ]


def nothing_usable_message(scan: ScanResult) -> str:
    """Why a scan gave no usable clip: what it looked at, and the failures by reason."""
    reasons = Counter(f.error for f in scan.failures)
    looked = "; ".join(scan.searched) or "nothing"
    if not scan.failures:
        return f"no clip found ({looked})"
    first = scan.failures[0]
    counts = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
    return (
        f"all {len(scan.failures)} clips failed at the source ({counts}; see failures.parquet); looked at: "
        f"{looked}. First: {first.clip_id}: {first.message}"
    )


def run_build(config: BuildConfig, overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """Build (or finish building) the shard set of `config` in config.out (a folder or a URI)."""
    started = time.perf_counter()
    out = config.out if storage.is_remote(config.out) else str(Path(config.out).resolve())
    shards_dir = storage.join(out, "shards")
    storage.makedirs(shards_dir)
    lock_path = storage.join(out, LOCK_NAME)
    # The run id in the lock file fences off writers a killed earlier run may have left behind.
    run_id = uuid.uuid4().hex
    fence = (lock_path, run_id)
    if storage.is_remote(out):  # no lock on an object store: the newest build owns the prefix
        storage.put_bytes(lock_path, run_id.encode())
        log.info(
            "%s: this build (run %s) owns the prefix; an older build stops at its next commit", out, run_id
        )
        return _build_locked(config, out, shards_dir, overwrite, progress, started, fence)
    lock = open(lock_path, "a+")  # noqa: SIM115 - held for the whole build
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise RuntimeError(f"another build is writing to {out}") from exc
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(run_id)
        lock.flush()
        os.fsync(lock.fileno())
        return _build_locked(config, out, shards_dir, overwrite, progress, started, fence)
    finally:
        lock.close()


def _build_locked(
    config: BuildConfig,
    out: str,
    shards_dir: str,
    overwrite: bool,
    progress: bool,
    started: float,
    fence: tuple[str, str],
) -> BuildSummary:
    if overwrite:
        _clear_outputs(out)
        storage.makedirs(shards_dir)
    _check_recipe(out, config)
    weights_dir = prepare_stage_weights(config)
    removed = remove_uncommitted(shards_dir)
    if removed:
        log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))
    scan = scan_source(config)
    if not scan.records:
        write_failures(out, _failure_rows(scan.failures))
        raise SourceError(nothing_usable_message(scan))
    manifest, manifest_failures = build_manifest(scan, config)
    atomic_write_parquet(storage.join(out, "manifest.parquet"), manifest)
    done = committed_keys(shards_dir)
    todo = manifest[~manifest["key"].isin(done)].reset_index(drop=True)
    failures = _failure_rows(scan.failures + manifest_failures)
    stats_before = {s["shard"] for s in read_stats(shards_dir)}
    log.info(
        "%d clips, %d samples planned, %d already built, %d to build",
        len(scan.records) + len(scan.failures),
        len(manifest),
        len(manifest) - len(todo),
        len(todo),
    )
    _write_build_json(out, config, None)
    if len(todo):
        stage_context = {"weights_dir": str(weights_dir) if weights_dir else "", "seed": config.seed}
        if any(stage.name == "swap" for stage in config.stages):
            stage_context["bank_path"] = str(_identity_bank(manifest, config, out, weights_dir))
        failures += _run_dag(todo, config, shards_dir, progress, fence, stage_context)
        # A writer killed with its node after writing its temp file (Ray ran it again elsewhere) leaves
        # that file behind; no writer of this run is left to commit it.
        orphans = remove_uncommitted(shards_dir)
        if orphans:
            log.info("removed %d uncommitted file(s) left by writers on lost workers", len(orphans))
    index, failure_frame = _finish_outputs(out, shards_dir, failures)
    stats = read_stats(shards_dir)
    new_stats = [s for s in stats if s["shard"] not in stats_before]
    clips_in = len(scan.records) + len(scan.failures)
    failed_clips = failure_frame[["dataset", "clip_id"]].drop_duplicates().shape[0]
    summary = BuildSummary(
        clips_in=clips_in,
        segments=len(manifest),
        skipped=len(manifest) - len(todo),
        written=sum(s["samples"] for s in new_stats),
        failed_clips=failed_clips,
        shards_written=len(new_stats),
        shards_total=len(stats),
        bytes_written=sum(s["bytes"] for s in new_stats),
        bytes_total=sum(s["bytes"] for s in stats),
        seconds=time.perf_counter() - started,
        failure_fraction=failed_clips / clips_in if clips_in else 0.0,
        source_counters=dict(scan.counters),
    )
    if len(index) != sum(s["samples"] for s in stats):
        held = sum(s["samples"] for s in stats)
        raise RuntimeError(f"index has {len(index)} rows but the committed shards hold {held} samples")
    _write_build_json(out, config, summary)
    return summary


def _finish_outputs(
    out: str, shards_dir: str, failures: list[dict[str, str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """index.parquet, then failures.parquet. A full disk does not stop the failures from being saved
    (where they fit): DiskFull is raised after, saying what was lost and what to do."""
    full = _disk_full_in(failures, shards_dir)
    index = pd.DataFrame()
    try:
        index = merge_index(out, shards_dir)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        full = full or DiskFull.from_error(exc, out)
    try:
        failure_frame = write_failures(out, failures)
        saved = True
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        full, saved = full or DiskFull.from_error(exc, out), False
    if full:
        not_written = sum(f["stage"] == "write" and f["error"] == full.cause for f in failures)
        raise DiskFull(full.path, full.cause, not_written, failures_saved=saved)
    return index, failure_frame


def _disk_full_in(failures: list[dict[str, str]], shards_dir: str) -> DiskFull | None:
    """A DiskFull when the writer could not write samples for lack of space."""
    for failure in failures:
        if failure["stage"] == "write" and failure["error"] in ("ENOSPC", "EDQUOT"):
            return DiskFull(shards_dir, failure["error"])
    return None


def _run_dag(
    todo: pd.DataFrame,
    config: BuildConfig,
    shards_dir: str,
    progress: bool,
    fence: tuple[str, str],
    stage_context: dict[str, Any],
) -> list[dict[str, str]]:
    """Run the Ray Data plan over `todo`; returns the failure rows of samples that did not make it."""
    from pipeline.dag import build_dataset, init_ray  # Ray is imported only when there is work
    from pipeline.visibility import check_nodes_see

    init_ray(config.num_cpus)
    shared = {"dataset root": str(Path(config.root).resolve())}
    if not storage.is_remote(shards_dir):
        shared["output folder"] = shards_dir
    if stage_context.get("weights_dir"):
        shared["WEIGHTS_DIR"] = str(Path(stage_context["weights_dir"]).resolve())
    check_nodes_see(shared, shards_dir)
    failures: list[dict[str, str]] = []
    retries = max((stage.max_task_retries for stage in config.stages), default=0)
    passes = config.lost_row_passes + 1
    left = todo
    with logs.progress(len(todo), "shards", "sample", enabled=progress) as bar:
        for number in range(1, passes + 1):
            if number > 1:
                log.warning(
                    "%d sample(s) lost their batch after %d tr%s (its actor died: a lost node, a crash, an "
                    "OOM kill); building them again, pass %d of %d",
                    len(left), retries + 1, "y" if retries == 0 else "ies", number, passes,
                )  # fmt: skip
            seen: set[str] = set()
            # A later pass starts its pools at one actor each: a lost node's share may never come back.
            dataset = build_dataset(left, config, shards_dir, fence, stage_context, elastic=number > 1)
            for row in dataset.iter_rows():
                seen.add(str(row["key"]))
                if row["status"] == "failed":
                    failures.append(
                        {
                            "clip_id": row["clip_id"],
                            "dataset": row["dataset"],
                            "key": row["key"],
                            "stage": row["error_stage"],
                            "error": row["error"],
                            "message": row["message"],
                        }
                    )
                bar.update(1)
            left = left[~left["key"].isin(seen)]
            if left.empty:
                break
            # A writer whose reply was lost may still have committed its samples.
            left = left[~left["key"].isin(committed_keys(shards_dir))].reset_index(drop=True)
            if left.empty:
                break
    for row in left.to_dict("records"):
        message = (
            f"its batch failed {retries + 1} times in each of {passes} pass(es) (the actor died: a crash, "
            "CUDA or host OOM; or an error outside the per-row guard); the Ray worker logs have the cause"
        )
        failures.append(
            {"clip_id": row["clip_id"], "dataset": row["dataset"], "key": row["key"], "stage": "annotators",
             "error": "task_failed", "message": message}
        )  # fmt: skip
    return failures


def _write_build_json(out: str, config: BuildConfig, summary: BuildSummary | None) -> None:
    data = {
        "pipeline_version": __version__,
        "recipe": _recipe(config),
        "config": dataclasses.asdict(config),
        "last_run": dataclasses.asdict(summary) if summary else None,
    }
    atomic_write_bytes(storage.join(out, "build.json"), json.dumps(data, indent=1, sort_keys=True).encode())
