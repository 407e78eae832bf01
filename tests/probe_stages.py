"""Stages that record which process saw each row (tests/test_dag.py): a row whose stages all ran in one
process reached one actor, so its frames crossed the object store only into and out of it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

from pipeline.rows import Row
from pipeline.stages.base import Stage, register_stage


class _Probe(Stage):
    def __init__(self, log: str = "") -> None:
        self.log = Path(log)

    def run(self, rows: list[Row]) -> list[Row]:
        with self.log.open("a") as handle:  # one short line per row: appends do not interleave
            for row in rows:
                handle.write(
                    json.dumps({"stage": self.name, "key": str(row["key"]), "pid": os.getpid()}) + "\n"
                )
        return super().run(rows)

    def process(self, row: Row) -> Row:
        return row


@register_stage
class ProbeMask(_Probe):
    name: ClassVar[str] = "probe_mask"


@register_stage
class ProbeGaze(_Probe):
    name: ClassVar[str] = "probe_gaze"


@register_stage
class ProbeSwap(_Probe):
    name: ClassVar[str] = "probe_swap"
    buckets: ClassVar[tuple[str, ...] | None] = ("swap",)
