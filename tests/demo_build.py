"""The default demo build several end-to-end modules share (built once per session in tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent


class DemoBuild(NamedTuple):
    root: Path  # the generated demo dataset
    out: Path  # the build's output folder
    result: subprocess.CompletedProcess  # the build command's exit code and log


def build_default_demo(base: Path) -> DemoBuild:
    """`python -m pipeline build --dataset demo` with every default (the annotators included)."""
    root, out = base / "data", base / "out"
    command = [sys.executable, "-m", "pipeline", "build", "--no-progress", "--dataset", "demo"]
    command += ["--root", str(root), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return DemoBuild(root, out, result)
