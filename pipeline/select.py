"""The gaze subset (stage-2 data): the samples with the most gaze movement, as their own shard set.

    OUT/gaze/shards/   shard-<hash>.tar, .index.parquet, .stats.json (pipeline/writer.py's layout)
    OUT/gaze/index.parquet
    OUT/gaze/select.json   score, rule, threshold, counts, selected keys (written last)

Members are copied byte for byte from the main shards (no video is decoded). In a local folder OUT/gaze
is a symbolic link to OUT/gaze.versions/<version>: a new subset is written to a fresh version folder and
the link is replaced in one rename, so at every instant (a SIGKILL included) a reader of OUT/gaze sees
the old subset or the new one, never half of one. The next run deletes unreferenced versions and temp
links. (A real OUT/gaze folder from before is swapped for the link in place, atomically where the
kernel supports it.) An object store has no rename: there select.json is deleted first,
the new shards are committed (each behind its stats marker, as in the build), the old ones deleted,
and select.json written last: while it is missing the subset is being replaced. A rerun that would
select the same samples from the same shards writes nothing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline import storage
from pipeline.writer import (
    atomic_write_bytes,
    merge_index,
    read_json,
    read_parquet,
    read_stats,
    write_shard,
    writer_row,
)

log = logging.getLogger(__name__)

SCORE_COLUMNS = {"robust": "gaze_robust_spread_deg", "authors": "gaze_authors"}
DEFAULT_TOP = 0.05  # the paper's stage 2: the top 5 % of clips by gaze movement
SUBSET_DIR = "gaze"
VERSIONS_DIR = f"{SUBSET_DIR}.versions"  # OUT/gaze links to one of its folders
LOCK_NAME = ".lock"  # inside VERSIONS_DIR
SPLIT = "train"
REBUILD_INDEX = "rerun the build with the same command: it rewrites index.parquet and build.json"
STAGE2_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "stage2.yaml"


def stage2_span(overlays: list[Path] | None = None) -> int:
    """Frames a stage-2 sample spans, (num_frames - 1) * stride + 1, from configs/train/stage2.yaml and
    any overlays (later wins), so the subset only holds segments stage 2 can sample."""
    data: dict[str, Any] = {}
    for path in [STAGE2_CONFIG, *(overlays or [])]:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
        data.update(section)
    return (int(data.get("num_frames", 16)) - 1) * int(data.get("stride", 12)) + 1


@dataclass
class Selection:
    score: str  # robust | authors
    column: str
    rule: str  # "top" (a fraction of the scored samples) or "threshold" (score > value)
    value: float
    threshold: float  # the score a sample needs (top: the lowest selected score)
    samples_scored: int  # eligible train samples with a score: what the rule ranks
    samples_total: int
    selected: int
    split: str  # only this split's samples are ranked (stage 2 trains on train)
    min_frames: int  # the frames a stage-2 sample spans: shorter segments are not eligible
    samples_other_splits: int
    samples_too_short: int  # train samples shorter than min_frames
    frames_selected: int
    source_fingerprint: str  # the main shards the subset was copied from
    keys: list[str]


def select_keys(
    index: pd.DataFrame, column: str, top: float | None = None, threshold: float | None = None
) -> tuple[list[str], float]:
    """Keys to keep and the threshold used. `top`: the highest-scoring fraction of the scored samples
    (at least one; ties at the cut are all kept); `threshold`: score > threshold. NaN never selected."""
    if column not in index.columns:
        return [], float("nan")
    scores = pd.to_numeric(index[column], errors="coerce")
    scored = scores.notna()
    if not scored.any():
        return [], float("nan")
    if threshold is None:
        fraction = DEFAULT_TOP if top is None else top
        count = max(1, math.ceil(fraction * int(scored.sum())))
        cut = float(np.sort(scores[scored].to_numpy())[::-1][count - 1])
        keep = scored & (scores >= cut)
    else:
        cut = float(threshold)
        keep = scored & (scores > cut)
    return sorted(index.loc[keep, "key"].astype(str)), cut


def _fingerprint(shards_dir: str) -> str:
    names = sorted(s["shard"] for s in read_stats(shards_dir))
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def _samples_per_shard(out: str) -> int:
    build_json = storage.join(out, "build.json")
    if storage.is_file(build_json):
        return int(read_json(build_json, REBUILD_INDEX).get("config", {}).get("samples_per_shard", 4))
    return 4


def _copied_rows(out: str, index: pd.DataFrame, keys: set[str]):
    """Writer rows of the selected samples, read shard by shard from the main tars."""
    for shard, rows in index[index["key"].isin(keys)].groupby("shard", sort=True):
        wanted = {str(k): row for k, row in zip(rows["key"], rows.to_dict("records"), strict=True)}
        members: dict[str, dict[str, bytes]] = {k: {} for k in wanted}
        tar_path = storage.join(out, "shards", f"{shard}.tar")
        with storage.open_input(tar_path, seekable=True) as handle, tarfile.open(fileobj=handle) as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                if key in members and info.isfile():
                    members[key][member] = tar.extractfile(info).read()
        for key in sorted(wanted):
            yield writer_row(wanted[key], members[key], int(wanted[key]["num_frames"]))


def run_select(
    out: Path | str,
    top: float | None = None,
    threshold: float | None = None,
    score: str = "robust",
    min_frames: int | None = None,
) -> tuple[Selection, bool]:
    """Write OUT/gaze for the given rule over the eligible train samples (min_frames: default
    stage2_span()); returns the selection and whether anything was written."""
    if top is not None and threshold is not None:
        raise ValueError("give --top or --threshold, not both")
    if score not in SCORE_COLUMNS:
        raise ValueError(f"score must be one of {sorted(SCORE_COLUMNS)}, got {score!r}")
    if top is not None and not 0 < top <= 1:
        raise ValueError(f"--top is a fraction in (0, 1], got {top}")
    out = str(out)
    index_path = storage.join(out, "index.parquet")
    if not storage.is_file(index_path):
        raise FileNotFoundError(f"no {index_path}: build the shards first")
    index = read_parquet(index_path, REBUILD_INDEX)
    min_frames = stage2_span() if min_frames is None else int(min_frames)
    in_split = index["split"] == SPLIT if "split" in index.columns else pd.Series(True, index=index.index)
    long_enough = index["num_frames"] >= min_frames if len(index) else in_split
    eligible = index[in_split & long_enough]
    column = SCORE_COLUMNS[score]
    keys, cut = select_keys(eligible, column, top, threshold)
    scored = int(pd.to_numeric(eligible[column], errors="coerce").notna().sum()) if column in index else 0
    selection = Selection(
        score=score,
        column=column,
        rule="threshold" if threshold is not None else "top",
        value=float(threshold if threshold is not None else (DEFAULT_TOP if top is None else top)),
        threshold=cut,
        samples_scored=scored,
        samples_total=len(index),
        selected=len(keys),
        split=SPLIT,
        min_frames=min_frames,
        samples_other_splits=int((~in_split).sum()),
        samples_too_short=int((in_split & ~long_enough).sum()),
        frames_selected=int(index.loc[index["key"].isin(keys), "num_frames"].sum()) if keys else 0,
        source_fingerprint=_fingerprint(storage.join(out, "shards")),
        keys=keys,
    )
    final = storage.join(out, SUBSET_DIR)
    if not storage.is_remote(out):
        with _select_lock(Path(out)):
            clean_leftovers(Path(out))  # a killed select's temp link or old version, even when up to date
    previous = read_selection(out)
    if previous is not None and _same(previous, asdict(selection)):
        log.info("gaze subset in %s is up to date (%d samples): nothing to write", final, len(keys))
        return selection, False
    if scored and not keys:
        log.warning("no sample scores above %s on %s", cut, column)
    elif not scored:
        log.warning(
            "no eligible %s sample (>= %d frames: %d of %d are shorter) has a %s score: the gaze subset is empty",
            SPLIT, min_frames, selection.samples_too_short, int(in_split.sum()), column,
        )  # fmt: skip
    if storage.is_remote(out):
        storage.delete(storage.join(final, "select.json"))  # the subset is being replaced
        _write_subset(out, final, index, keys, selection)
    else:
        _publish_local(Path(out), index, keys, selection)
    log.info(
        "gaze subset: %d of %d eligible %s samples (%s %s, threshold %.4g); not eligible: %d shorter than "
        "%d frames, %d in other splits",
        len(keys), len(eligible), SPLIT, column, selection.rule, cut,
        selection.samples_too_short, min_frames, selection.samples_other_splits,
    )  # fmt: skip
    return selection, True


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    fields = ("column", "rule", "value", "keys", "source_fingerprint", "split", "min_frames")
    return all(old.get(f) == new.get(f) for f in fields)


def _write_subset(out: str, target: str, index: pd.DataFrame, keys: list[str], selection: Selection) -> None:
    """The subset in `target` (a fresh local temp folder, or OUT/gaze itself on an object store, where
    objects of shards not in the new subset are deleted); select.json last."""
    shards_dir = storage.join(target, "shards")
    storage.makedirs(shards_dir)
    per_shard = _samples_per_shard(out)
    written: set[str | None] = set()
    batch: list[dict[str, Any]] = []
    for row in _copied_rows(out, index, set(keys)) if keys else ():
        batch.append(row)
        if len(batch) == per_shard:
            written.add(write_shard(batch, shards_dir))
            batch = []
    if batch:
        written.add(write_shard(batch, shards_dir))
    for name in storage.list_names(shards_dir):  # the old subset's shards (none in a fresh folder)
        if name.split(".", 1)[0] not in written:
            storage.delete(storage.join(shards_dir, name))
    merge_index(target, shards_dir)
    data = asdict(selection)
    data["shards"] = len(read_stats(shards_dir))
    atomic_write_bytes(storage.join(target, "select.json"), json.dumps(data, indent=1).encode())


def _publish_local(out: Path, index: pd.DataFrame, keys: list[str], selection: Selection) -> None:
    """Write the subset to a fresh version folder, then point OUT/gaze at it in one rename."""
    with _select_lock(out):
        clean_leftovers(out)
        version = out / VERSIONS_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        _write_subset(str(out), str(version), index, keys, selection)
        _point_at(out / SUBSET_DIR, version)
        clean_leftovers(out)


@contextmanager
def _select_lock(out: Path) -> Iterator[None]:
    """One select at a time per output folder: a second would clean up the first one's version."""
    out_versions(out).mkdir(parents=True, exist_ok=True)
    with open(out_versions(out) / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeError(f"another select is writing {out / SUBSET_DIR}") from exc
        yield


def _point_at(link: Path, version: Path) -> None:
    """Make `link` a relative symlink to `version`, atomically: a new link under a temp name renamed
    over the old one. A real folder there (the layout before versions) is exchanged for the link."""
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(version, link.parent), tmp)
    if link.is_symlink() or not link.exists():
        os.replace(tmp, link)
        return
    if _exchange(tmp, link):  # tmp now names the old folder
        shutil.rmtree(tmp)
        return
    # No atomic exchange here (an older kernel, NFS): the old folder becomes a version first. A kill
    # between these two renames leaves no OUT/gaze until the next select, which points it again.
    os.rename(link, out_versions(link.parent) / "00000000T000000-before")  # sorts before any new one
    os.replace(tmp, link)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def out_versions(out: Path) -> Path:
    return out / VERSIONS_DIR


def clean_leftovers(out: Path) -> list[str]:
    """Delete what a killed or finished select left: temp links, versions OUT/gaze does not point at,
    and the temp / old folders of the layout before versions. A missing OUT/gaze (a kill inside the
    non-atomic fallback) is pointed at the newest complete version first."""
    link = out / SUBSET_DIR
    versions = out_versions(out)
    if not link.exists() and not link.is_symlink():
        complete = sorted(p for p in versions.glob("*") if (p / "select.json").is_file())
        if complete:
            _point_at(link, complete[-1])
    current = link.resolve() if link.is_symlink() else None
    removed = []
    for path in [*out.glob(f".{SUBSET_DIR}.*"), *versions.glob("*")]:
        if path.name == LOCK_NAME or (path.resolve() == current and not path.is_symlink()):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
        removed.append(path.name)
    if removed:
        log.info("removed %d leftover(s) of an earlier select: %s", len(removed), ", ".join(sorted(removed)))
    return removed


def remove_subset(out: Path | str) -> None:
    """Delete the gaze subset: the link, every version and any leftover (an object store: the prefix)."""
    if storage.is_remote(out):
        storage.delete_tree(storage.join(out, SUBSET_DIR))
        return
    out = Path(out)
    link = out / SUBSET_DIR
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    shutil.rmtree(out_versions(out), ignore_errors=True)
    for path in out.glob(f".{SUBSET_DIR}.*"):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


def read_selection(out: Path | str) -> dict[str, Any] | None:
    path = storage.join(out, SUBSET_DIR, "select.json")
    return read_json(path, "run select again: it rewrites the subset") if storage.is_file(path) else None
