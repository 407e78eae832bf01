"""Test-wide settings, and the default demo build that several end-to-end modules share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from demo_build import DemoBuild, build_default_demo

# The build CLI must start its own loopback Ray in tests, never join a cluster from the environment.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def default_demo_build(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    """The default demo (every annotator), built once per session as `make shards` builds it. Tests that
    read it must not write into OUT; the trainer's `demo_out` adds the gaze subset (OUT/gaze), which
    leaves OUT/shards and the build's tables untouched."""
    return build_default_demo(tmp_path_factory.mktemp("demo"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`-m own_process` (make test's second run) selects a few tests: skip importing the modules that
    cannot hold one (the marker is only ever written in the test module itself), ~20 s of collection."""
    if config.option.markexpr.strip() != "own_process":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return "own_process" not in collection_path.read_text(errors="replace") or None
