"""The annotator interface and registry.

An annotator is a `Stage` subclass: its model is loaded once per actor in `__init__`, rows are
processed in `process`, and the DAG gives it the resources its StageConfig names. Stages that only
apply to some buckets (face swap, stylisation) say so in `buckets`; other rows pass through untouched.
`StageChain` runs several stages in one actor (the DAG's default, see pipeline/dag.py).
Stage modules are imported only when a build uses them, so CPU tasks never load torch or ONNX.
"""

from __future__ import annotations

import importlib
import json
import sys
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
        return rows_to_batch(self.run(batch_to_rows(batch)))

    def run(self, rows: list[Row]) -> list[Row]:
        """Annotate the rows this stage applies to; every row leaves with the stage's output fields."""
        step = guarded(self.name, self._annotate)
        rows = [step(row) if self.applies_to(row) else row for row in rows]
        for row in rows:
            for field, default in self.outputs.items():
                row.setdefault(field, default)
        return rows

    def _annotate(self, row: Row) -> Row:
        row = self.process(row)
        annotations = json.loads(row.get("annotations") or "[]")
        row["annotations"] = json.dumps([*annotations, self.name])
        return row


class StageChain:
    """Several stages in one actor, run in sequence on each batch: the rows (and their frames) stay in
    this process between them instead of crossing the object store to the next pool. A stage still
    sees only the rows it applies to. Ray Data gives the actor the stages' summed resources
    (pipeline/dag.py plan_pools); `members` are (stage class, constructor kwargs), each kwargs holding
    that stage's own `gpu_share` where it asks for one (ONNX Runtime caps each session's arena)."""

    def __init__(self, members: list[tuple[type[Stage], dict[str, Any]]], gpu_share: float = 0.0) -> None:
        self.stages = [stage_cls(**kwargs) for stage_cls, kwargs in members]
        # torch's cap is per process and each stage set its own share: the last one would win, so the
        # actor's whole share is the cap (its ONNX sessions are capped separately, each at its stage's).
        if "torch" in sys.modules:
            import torch

            from pipeline.stages.device import limit_torch_memory

            if torch.cuda.is_available():
                limit_torch_memory(torch.device("cuda", torch.cuda.current_device()), gpu_share)

    def __call__(self, batch: Batch) -> Batch:
        rows = batch_to_rows(batch)
        for stage in self.stages:
            rows = stage.run(rows)
        return rows_to_batch(rows)


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
