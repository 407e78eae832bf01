"""Annotators (one module each) and the interface they share (base.py)."""

from pipeline.stages.base import STAGES, Stage, get_stage, register_stage

__all__ = ["STAGES", "Stage", "get_stage", "register_stage"]
