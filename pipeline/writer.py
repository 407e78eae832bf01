"""Shards, index and failures in a folder or under an object-store prefix (pipeline/storage.py), written so
that a killed run never leaves a partial shard visible.

A shard `<name>.tar` is published atomically (locally a temp name renamed; on S3 one upload); its index
part `<name>.index.parquet` follows the same way; its stats `<name>.stats.json` is written last and is
the commit marker. Readers list only shards with a marker. A rerun trusts only shards with stats,
deletes everything else in the shard folder, and skips the samples the committed shards hold.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import contract, storage
from pipeline.contract import SampleMeta
from pipeline.rows import ERROR_FIELDS, Row, batch_to_rows, is_failed, text_field
from pipeline.video import EncodeSettings, encode_mp4

log = logging.getLogger(__name__)

TAR_MTIME = 1_600_000_000  # fixed member mtime: the same samples give byte-identical tars
STATS_SUFFIX, INDEX_SUFFIX = ".stats.json", ".index.parquet"
# Row fields the annotators fill, and the member each one becomes.
MASK_FIELDS = {"face_mask": contract.FACE_MASK, "fg_mask": contract.FG_MASK}
Location = str | Path  # a local path or a URI (s3://bucket/prefix/...): see pipeline/storage.py


# Errors that mean "no room left": the fix is freeing space, not changing the input.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def errno_name(exc: OSError) -> str:
    """ENOSPC, EIO, ...: the cause as a failure row's `error`."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def free_bytes(location: Location) -> int | None:
    """Free bytes on the local filesystem holding `location` (its nearest existing parent); None on an
    object store or when it cannot be told."""
    if storage.is_remote(location):
        return None
    path = Path(location).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(count: int | None) -> str:
    if count is None:
        return "unknown"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def write_error_message(exc: OSError) -> str:
    """What could not be written and why; for a full disk, how much room is left there."""
    path = exc.filename or "the output"
    message = f"could not write {path}: {exc.strerror or exc}"
    if is_disk_full(exc):
        message += f" ({format_bytes(free_bytes(path))} free on that filesystem)"
    return message


@contextmanager
def writing(path: Location) -> Iterator[None]:
    """Name `path` in an OSError raised inside (a failed write() or fsync() carries no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def atomic_write_bytes(path: Location, data: bytes) -> None:
    """Locally: a temp file beside `path`, fsynced, renamed over it; on an object store: one PUT."""
    with writing(path):
        storage.put_bytes(path, data)


def atomic_write_parquet(path: Location, frame: pd.DataFrame) -> None:
    with writing(path):
        storage.put_parquet(path, frame)


def read_json(path: Location, fix: str = "") -> Any:
    """A JSON file; a damaged one is a ValueError that names it (and says `fix`)."""
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({exc}){fix and '; ' + fix}") from exc


def read_parquet(path: Location, fix: str = "") -> pd.DataFrame:
    """A Parquet file; a damaged one is a ValueError that names it (and says `fix`)."""
    try:
        return storage.read_parquet(path)
    except ValueError as exc:  # pyarrow's ArrowInvalid: bad magic bytes, truncated footer
        raise ValueError(f"{path} is not a readable Parquet file ({exc}){fix and '; ' + fix}") from exc


def _json_field(row: Row, name: str, default: Any) -> Any:
    value = text_field(row, name)
    return json.loads(value) if value else default


def sample_meta(row: Row, resolution: int) -> SampleMeta:
    return SampleMeta(
        key=str(row["key"]),
        clip_id=str(row["clip_id"]),
        dataset=str(row["dataset"]),
        identity=str(row["identity"]),
        source=str(row["source"]),
        fps=float(row["fps"]),
        num_frames=int(row["num_frames"]),
        segment=int(row["segment"]),
        frame_start=int(row["frame_start"]),
        frame_stop=int(row["frame_stop"]),
        crop_box=_json_field(row, "crop_box", []),
        resolution=resolution,
        bucket=str(row["bucket"]),
        split=split_of(row),
        labels=_json_field(row, "labels", {}),
        swap_source_identity=row.get("swap_source_identity") or None,
        style_prompt=row.get("style_prompt") or None,
        style_seed=None if row.get("style_seed") in (None, "", -1) else int(row["style_seed"]),
        gaze_scores=_json_field(row, "gaze_scores", {}),
        fg_backend=row.get("fg_backend") or None,
        annotations=_json_field(row, "annotations", []),
        weights=_json_field(row, "weights", {}),
        extra=_json_field(row, "extra", {}),
    )


def encode_members(row: Row, resolution: int, video: EncodeSettings) -> Row:
    """Replace a row's arrays by the bytes of its shard members (one column per member)."""
    fps = float(row["fps"])
    members = {contract.REAL: encode_mp4(row.pop("frames"), fps, video)}
    driving = row.pop("driving_frames", None)
    if driving is not None and len(driving):
        members[contract.VIDEO_MEMBER_OF_BUCKET[str(row["bucket"])]] = encode_mp4(driving, fps, video)
    for field, member in MASK_FIELDS.items():
        mask = row.pop(field, None)
        if mask is not None and len(mask):
            members[member] = contract.encode_mask(np.asarray(mask, bool))
    gaze = row.pop("gaze", None)
    if gaze is not None and len(gaze):
        members[contract.GAZE] = contract.encode_gaze(np.asarray(gaze, np.float32))
    members[contract.META] = sample_meta(row, resolution).to_json_bytes()
    return writer_row(row, members, int(row["num_frames"]))


def as_writer_row(row: Row) -> Row:
    """Encoded rows pass; a failed row keeps its identifiers and error, and no pixels."""
    return writer_row(row, {}, 0) if is_failed(row) else row


def writer_row(row: Row, members: dict[str, bytes], num_frames: int) -> Row:
    """The columns the shard writer reads: identifiers, errors, timings and one bytes column per member."""
    out = {
        name: row.get(name, "")
        for name in ("key", "clip_id", "dataset", "bucket", "split", "timings", *ERROR_FIELDS)
    }
    out["num_frames"] = num_frames
    for member in contract.ALL_MEMBERS:
        out[member] = members.get(member, b"")
    return out


def shard_name(keys: Iterable[str]) -> str:
    """Named by its content, so concurrent writers need no coordination and reruns are idempotent."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return f"shard-{digest}"


def _index_row(meta: SampleMeta, shard: str, sizes: dict[str, int]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": meta.key,
        "shard": shard,
        "clip_id": meta.clip_id,
        "dataset": meta.dataset,
        "identity": meta.identity,
        "bucket": meta.bucket,
        "split": meta.split,
        "num_frames": meta.num_frames,
        "fps": meta.fps,
        "segment": meta.segment,
        "frame_start": meta.frame_start,
        "frame_stop": meta.frame_stop,
        "resolution": meta.resolution,
        "crop_box": meta.crop_box,
        "source": meta.source,
        "swap_source_identity": meta.swap_source_identity,
        "style_prompt": meta.style_prompt,
        "style_seed": meta.style_seed,
        "fg_backend": meta.fg_backend,
        "annotations": json.dumps(meta.annotations),
        "weights": json.dumps(meta.weights, sort_keys=True),
        "extra": json.dumps(meta.extra, sort_keys=True),
        "pipeline_version": meta.pipeline_version,
    }
    row.update({kind: ",".join(meta.labels.get(kind, [])) for kind in contract.LABEL_KINDS})
    row.update({f"gaze_{name}": float(value) for name, value in meta.gaze_scores.items()})
    row.update({f"size_{member.replace('.', '_')}": size for member, size in sizes.items()})
    return row


def _add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """One sample as WebDataset lays it out: `<key>.<member>` entries in member-name order, with the
    fixed mtime, mode and owner webdataset's TarWriter gives them (so tars are reproducible). Written
    with tarfile itself: webdataset imports torch, which every write task would then load."""
    for member in sorted(members):
        data = members[member]
        info = tarfile.TarInfo(f"{key}.{member}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uname = info.gname = "bigdata"
        tar.addfile(info, io.BytesIO(data))


class StaleRun(RuntimeError):
    """A newer build owns the output folder: this (orphaned) writer must not commit."""


def run_is_current(fence: tuple[str, str] | None) -> bool:
    """fence = (lock file or object, run id): the build that started this writer still owns the output.
    An unreadable fence counts as lost: not committing is the safe side."""
    if fence is None:
        return True
    path, run_id = fence
    try:
        return storage.read_text(path).strip() == run_id
    except OSError:  # FileNotFoundError, or the store cannot be read
        return False


def split_of(row: Row) -> str:
    return text_field(row, "split") or "train"


def write_shard(rows: list[Row], shards_dir: Location, fence: tuple[str, str] | None = None) -> str | None:
    """Commit the healthy rows (all of one split) as one shard; returns its name, or None when no row
    is healthy.

    `fence` guards against a worker orphaned by a killed build committing after a rerun has read
    the committed set: the stats marker is written only while the fence's run id is current.
    """
    good = [row for row in rows if not is_failed(row)]
    if not good:
        return None
    splits = {split_of(row) for row in good}
    if len(splits) > 1:
        raise ValueError(f"a shard holds one split; these rows are {sorted(splits)}")
    name = shard_name(str(row["key"]) for row in good)
    try:
        _commit_shard(rows, good, name, splits.pop(), shards_dir, fence)
    except OSError:
        # Free what this shard took (a full disk) and leave no uncommitted part behind.
        for suffix in (".tar", INDEX_SUFFIX):
            with suppress(OSError):
                storage.delete(storage.join(shards_dir, f"{name}{suffix}"))
        raise
    return name


def _commit_shard(
    rows: list[Row],
    good: list[Row],
    name: str,
    split: str,
    shards_dir: Location,
    fence: tuple[str, str] | None,
) -> None:
    """Tar, then index part, then the stats marker: each published atomically, the marker last."""
    started = time.perf_counter()
    final = storage.join(shards_dir, f"{name}.tar")
    index_part = storage.join(shards_dir, f"{name}{INDEX_SUFFIX}")
    index_rows, member_bytes = [], Counter()
    with writing(final), storage.staged_file(final, suffix=".tar") as tmp:
        with open(tmp, "wb") as handle, tarfile.open(fileobj=handle, mode="w|") as tar:
            for row in good:
                members = {m: bytes(row[m]) for m in contract.ALL_MEMBERS if len(row[m])}
                _add_sample(tar, str(row["key"]), members)
                sizes = {m: len(v) for m, v in members.items()}
                member_bytes.update(sizes)
                meta = SampleMeta.from_json_bytes(members[contract.META])
                index_rows.append(_index_row(meta, name, sizes))
        tar_bytes = tmp.stat().st_size
    atomic_write_parquet(index_part, pd.DataFrame(index_rows))
    timings: Counter[str] = Counter()
    for row in rows:
        timings.update(json.loads(str(row.get("timings") or "{}")))
    timings["write"] += time.perf_counter() - started
    failed = [row for row in rows if is_failed(row)]
    stats = {
        "shard": f"{name}.tar",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pipeline_version": contract.PIPELINE_VERSION,
        contract.SPLIT_FIELD: split,
        "samples": len(good),
        "keys": sorted(str(row["key"]) for row in good),
        "frames": sum(int(row["num_frames"]) for row in good),
        "bytes": tar_bytes,
        "member_bytes": dict(member_bytes),
        "buckets": dict(Counter(str(row["bucket"]) for row in good)),
        "failures": dict(Counter(f"{row['error_stage']}/{row['error']}" for row in failed)),
        "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
    }
    if not run_is_current(fence):
        storage.delete(final)
        storage.delete(index_part)
        raise StaleRun(f"{shards_dir} belongs to a newer build; not committing {name}")
    atomic_write_bytes(
        storage.join(shards_dir, f"{name}{STATS_SUFFIX}"), json.dumps(stats, indent=1).encode()
    )


def mark_write_failed(rows: list[Row], exc: OSError) -> None:
    """The healthy rows of a shard that could not be written become failures of stage `write`."""
    for row in rows:
        if not is_failed(row):
            row.update(error_stage="write", error=errno_name(exc), message=write_error_message(exc))


def write_shard_batch(
    batch: dict[str, np.ndarray], shards_dir: str, fence: tuple[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Ray Data step: one batch becomes one shard per split it holds (the manifest keeps splits
    together, so usually one); returns one status row per input row."""
    rows = batch_to_rows(batch)
    shard_of_split = {}
    for split in sorted({split_of(row) for row in rows}):
        group = [row for row in rows if split_of(row) == split]
        try:
            shard_of_split[split] = write_shard(group, shards_dir, fence) or ""
        except OSError as exc:  # a full disk, a lost mount: the samples fail with the real cause
            log.error("%s", write_error_message(exc))
            mark_write_failed(group, exc)
            shard_of_split[split] = ""
    failed = [is_failed(row) for row in rows]
    shards = [shard_of_split[split_of(row)] for row in rows]
    return {
        "key": np.array([str(row["key"]) for row in rows]),
        "clip_id": np.array([str(row["clip_id"]) for row in rows]),
        "dataset": np.array([str(row["dataset"]) for row in rows]),
        "status": np.array(["failed" if f else "written" for f in failed]),
        "shard": np.array(["" if f else shard for f, shard in zip(failed, shards, strict=True)]),
        "num_frames": np.array([int(row["num_frames"]) for row in rows], np.int64),
        **{name: np.array([str(row[name]) for row in rows]) for name in ERROR_FIELDS},
    }


# A damaged marker or index part: without its marker the shard is uncommitted, and a build redoes it.
REBUILD_SHARD = "delete that shard's .stats.json and rerun the build: the shard is built again"


def committed_names(shards_dir: Location) -> list[str]:
    """Names (shard-<hash>) of the committed shards: those whose stats marker exists."""
    names = storage.list_names(shards_dir)
    return [n[: -len(STATS_SUFFIX)] for n in names if n.startswith("shard-") and n.endswith(STATS_SUFFIX)]


def read_stats(shards_dir: Location) -> list[dict[str, Any]]:
    """Stats of every committed shard."""
    return [
        read_json(storage.join(shards_dir, f"{name}{STATS_SUFFIX}"), REBUILD_SHARD)
        for name in committed_names(shards_dir)
    ]


def committed_keys(shards_dir: Location) -> set[str]:
    return {key for stats in read_stats(shards_dir) for key in stats["keys"]}


def remove_uncommitted(shards_dir: Location) -> list[str]:
    """Delete temp files and any shard file or object whose stats marker is missing (a run killed
    mid-commit). Only the build that owns the output (its lock, or on S3 its fence) may call this."""
    committed = set(committed_names(shards_dir))
    removed = []
    for name in storage.list_names(shards_dir):
        if name.startswith(".") or name.split(".", 1)[0] not in committed:
            storage.delete(storage.join(shards_dir, name))
            removed.append(name)
    return removed


def merge_index(out: Location, shards_dir: Location) -> pd.DataFrame:
    """index.parquet = the index parts of every committed shard, ordered by key."""
    parts = [
        read_parquet(
            storage.join(shards_dir, f"{stats['shard'][: -len('.tar')]}{INDEX_SUFFIX}"), REBUILD_SHARD
        )
        for stats in read_stats(shards_dir)
    ]
    index = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(index):
        index = index.sort_values("key", ignore_index=True)
    atomic_write_parquet(storage.join(out, "index.parquet"), index)
    return index


FAILURE_COLUMNS = ["clip_id", "dataset", "key", "stage", "error", "message"]


def write_failures(out: Location, failures: list[dict[str, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(failures, columns=FAILURE_COLUMNS).sort_values(["dataset", "clip_id", "key"])
    atomic_write_parquet(storage.join(out, "failures.parquet"), frame.reset_index(drop=True))
    return frame
