"""The annotator interface and registry.

An annotator is a `Stage` subclass: its model is loaded once per actor in `__init__`, rows are
processed in `process`, and the DAG gives it the resources its StageConfig names. Stages that only
apply to some buckets (face swap, stylisation) say so in `buckets`; other rows pass through untouched.
Stage modules are imported only when a build uses them, so CPU tasks never load torch or ONNX.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, ClassVar

from pipeline.rows import Batch, Row, batch_to_rows, guarded, is_failed, rows_to_batch

# Stage name -> the module that defines (and registers) it.
STAGE_MODULES = {
    "face_mask": "pipeline.stages.face_mask",
    "foreground": "pipeline.stages.foreground",
    "gaze": "pipeline.stages.gaze",
    "swap": "pipeline.stages.face_swap",
    "stylise": "pipeline.stages.stylise",
}


class Stage:
    """Base class of annotators run as Ray Data actor pools.

    Subclasses set `name` (also the key of the annotation recorded in the sample json), optionally
    `buckets` and `outputs`, load their model in `__init__(self, weights_dir: str, **options)` and
    implement `process(row) -> row`. `weights_needed(options)` names the configs/weights.yaml entries
    the stage reads, so a build can check (full profile) or write (tiny profile) them before it starts.
    """

    name: ClassVar[str] = "stage"
    buckets: ClassVar[tuple[str, ...] | None] = None  # None: every bucket
    # Row fields the stage adds, with the value rows it skips get, so every batch stays rectangular.
    outputs: ClassVar[dict[str, Any]] = {}

    @classmethod
    def weights_needed(cls, options: dict[str, Any]) -> list[str]:
        return []

    def applies_to(self, row: Row) -> bool:
        return not is_failed(row) and (self.buckets is None or str(row["bucket"]) in self.buckets)

    def process(self, row: Row) -> Row:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        rows = batch_to_rows(batch)
        step = guarded(self.name, self._annotate)
        rows = [step(row) if self.applies_to(row) else row for row in rows]
        for row in rows:
            for field, default in self.outputs.items():
                row.setdefault(field, default)
        return rows_to_batch(rows)

    def _annotate(self, row: Row) -> Row:
        row = self.process(row)
        annotations = json.loads(row.get("annotations") or "[]")
        row["annotations"] = json.dumps([*annotations, self.name])
        return row


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to configs by its `name`."""
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise ValueError(f"two stages named {cls.name!r}: {STAGES[cls.name]} and {cls}")
    STAGES[cls.name] = cls
    return cls


def get_stage(name: str) -> type[Stage]:
    """The stage class of a config name, importing its module on first use."""
    if name not in STAGES and name in STAGE_MODULES:
        importlib.import_module(STAGE_MODULES[name])
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {sorted(set(STAGES) | set(STAGE_MODULES))}")
    return STAGES[name]


def load_all_stages() -> dict[str, type[Stage]]:
    """Import every stage module (which also registers the tiny writers of their weights)."""
    for name in STAGE_MODULES:
        get_stage(name)
    return STAGES
