"""Annotators (one module each, imported on first use) and the interface they share (base.py)."""

from pipeline.stages.base import STAGE_MODULES, STAGES, Stage, get_stage, load_all_stages, register_stage

__all__ = ["STAGES", "STAGE_MODULES", "Stage", "get_stage", "load_all_stages", "register_stage"]
