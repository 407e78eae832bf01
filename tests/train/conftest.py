"""Shared trainer fixtures: the default demo shards (and their gaze subset), built once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from demo_build import DemoBuild

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="session")
def demo_out(default_demo_build: DemoBuild) -> Path:
    """`make shards` for the demo dataset: OUT/shards (the mix) and OUT/gaze/shards (the gaze subset).
    The build is the session's shared default demo (tests/conftest.py); select runs as make shards does."""
    out = default_demo_build.out
    select = ["select", "--out", str(out), "--train-config", "configs/train/tiny.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *select], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "gaze" / "shards").glob("*.tar")), "the demo gaze subset is empty"
    return out


@pytest.fixture(scope="session")
def tiny_model_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MegActor weights folder (components + an untrained checkpoint in megactor/)."""
    from model.loading import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("tiny_model"), seed=0)
