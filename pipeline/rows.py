"""Row conventions of the shard-building DAG (light: no model imports, every CPU task loads this).

A row is one clip segment travelling through Ray Data as a dict. Besides the manifest fields it
carries `frames` (uint8 [T,R,R,3]) after decoding, and three string fields for failures:
`error_stage`, `error`, `message` (empty while the row is healthy). A step that fails on a row marks
it and drops its frames; every later step passes a failed row through untouched and the writer turns
it into a failure record. Nothing raises out of a row, so one bad clip never stops a run.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Row = dict[str, Any]
Batch = dict[str, np.ndarray]
ERROR_FIELDS = ("error_stage", "error", "message")


def text_field(row: Row, name: str) -> str:
    """A string field of a row; "" where it is missing or NaN (a manifest made without that column)."""
    value = row.get(name)
    return value if isinstance(value, str) else ""


def is_failed(row: Row) -> bool:
    return bool(row.get("error_stage"))


def mark_failed(row: Row, stage: str, exc: BaseException) -> Row:
    """Record why `stage` failed on this row and free its pixel data."""
    row["error_stage"] = stage
    row["error"] = getattr(exc, "reason", None) or type(exc).__name__
    row["message"] = f"{exc}"[:2000] or traceback.format_exc(limit=2)[-2000:]
    if "frames" in row:
        row["frames"] = np.zeros((0, 1, 1, 3), np.uint8)
    return row


def add_timing(row: Row, stage: str, seconds: float) -> None:
    timings = json.loads(row.get("timings") or "{}")
    timings[stage] = timings.get(stage, 0.0) + seconds
    row["timings"] = json.dumps(timings)


def update_json_field(row: Row, field: str, values: dict[str, Any]) -> None:
    """Merge `values` into a JSON-object string field shared by stages (`extra`, `weights`, `gaze_scores`)."""
    current = json.loads(str(row.get(field) or "{}"))
    current.update(values)
    row[field] = json.dumps(current, sort_keys=True)


def guarded(stage: str, fn: Callable[[Row], Row]) -> Callable[[Row], Row]:
    """Wrap a row function so failures become data and time spent is recorded."""

    def run(row: Row) -> Row:
        if is_failed(row):
            return row
        start = time.perf_counter()
        try:
            row = fn(row)
        except Exception as exc:  # noqa: BLE001 - any error on one clip is recorded, not raised
            log.warning("%s failed on %s: %s", stage, row.get("key"), exc)
            row = mark_failed(row, stage, exc)
        add_timing(row, stage, time.perf_counter() - start)
        return row

    run.__name__ = f"{stage}_step"
    return run


def batch_to_rows(batch: Batch) -> list[Row]:
    names = list(batch)
    size = len(batch[names[0]]) if names else 0
    return [{name: batch[name][i] for name in names} for i in range(size)]


def _missing_value(example: Any) -> Any:
    """What a row that lacks a field gets in a batch, by the type of a row that has it."""
    if isinstance(example, np.ndarray):
        return np.zeros((0, *example.shape[1:]), example.dtype)
    if isinstance(example, (str, np.str_)):
        return ""
    if isinstance(example, (bool, np.bool_)):
        return False
    if isinstance(example, (int, np.integer)):
        return 0
    if isinstance(example, (float, np.floating)):
        return float("nan")
    return None


def rows_to_batch(rows: list[Row]) -> Batch:
    """Inverse of batch_to_rows over the union of the rows' fields (a failed row lacks what a stage
    added to the healthy ones; the first row decides nothing). Arrays of differing shapes go into an
    object array."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    batch: Batch = {}
    for name in names:
        example = next(row[name] for row in rows if name in row)
        values = [row[name] if name in row else _missing_value(example) for row in rows]
        if isinstance(example, np.ndarray) and len({np.shape(v) for v in values}) > 1:
            column = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):
                column[i] = value
            batch[name] = column
        elif isinstance(example, np.ndarray):
            batch[name] = np.stack(values)
        else:
            batch[name] = np.asarray(values)
    return batch
