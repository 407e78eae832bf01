"""Dataset readers: each turns a dataset folder into clip records and per-clip failures."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.sources.base import ClipFailure, ClipRecord, ScanResult, SourceError
from pipeline.sources.celebvhq import scan_celebvhq
from pipeline.sources.demo import scan_demo
from pipeline.sources.vfhq import scan_vfhq

__all__ = ["ClipFailure", "ClipRecord", "ScanResult", "SourceError", "scan_source"]


def scan_source(config: BuildConfig) -> ScanResult:
    """Read the dataset named by config.dataset under config.root."""
    root = Path(config.root)
    if config.dataset == "demo":
        return scan_demo(root, config.demo)
    if not root.is_dir():
        raise SourceError(f"dataset root {root} does not exist")
    if config.dataset == "vfhq":
        return scan_vfhq(root, config.vfhq)
    if config.dataset == "celebvhq":
        return scan_celebvhq(root, config.celebvhq)
    raise SourceError(f"unknown dataset {config.dataset!r}")
