"""Annotators (one module each) and the interface they share (base.py)."""

from pipeline.stages.base import STAGES, Stage, get_stage, register_stage

# Importing a stage module registers the stage and the tiny writers of its weights.
from pipeline.stages import face_mask, face_swap, foreground, gaze, stylise  # noqa: E402, F401  isort: skip

__all__ = ["STAGES", "Stage", "get_stage", "register_stage"]
