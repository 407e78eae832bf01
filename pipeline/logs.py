"""Logging of the command-line entry points: our own lines on stderr, Ray's own logs in Ray's log folder.

A build or training run writes a few lines a person reads (in a terminal or in a nohup / Slurm file).
Ray, left alone, adds its progress block every few seconds, memory warnings, connection notes and the
C++ core worker's lines; those stay in Ray's session folder (/tmp/ray/session_*/logs) unless `--verbose`.
In a terminal our progress is a bar; in a file a progress line at most every PROGRESS_EVERY_S seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_EVERY_S = 60.0

_verbose = False


def setup_logging(verbose: bool = False) -> None:
    """Our format at INFO on stderr; Ray quiet unless `verbose`."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    if not verbose:
        # The driver's C++ core worker prints warnings and errors on stderr; they are in Ray's logs too.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")


def verbose() -> bool:
    return _verbose


def ray_init_kwargs() -> dict[str, Any]:
    """What ray.init needs for the quiet (or verbose) driver."""
    return {"logging_level": logging.INFO if _verbose else logging.ERROR}


def quiet_ray() -> None:
    """Before ray.init: Ray's token-auth note and connection lines, and Ray Data's per-operator progress
    block, memory warnings and INFO lines, on the console only with --verbose; Ray Data's own
    ray-data.log in the session folder keeps everything."""
    import ray.data  # configures the "ray" and "ray.data" loggers: adjust them after

    if not _verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = _verbose and sys.stderr.isatty()
    context.print_on_execution_start = _verbose
    context.enable_auto_log_stats = _verbose
    if _verbose:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)


class ProgressLines:
    """tqdm's interface for a log file: `desc: n/total unit` at most every `every_s` seconds, and at the end."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.started = self.last = time.monotonic()
        self.log = logging.getLogger("pipeline.progress")

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.log.info("%s: %d/%d %s (%.0f s)", self.desc, self.n, self.total, self.unit, now - self.started)

    def close(self) -> None:
        pass

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar in a terminal; in a file (or with the bar off) throttled log lines."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return ProgressLines(total, desc, unit)
