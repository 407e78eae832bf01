"""Shared tiny fixtures: one random tiny weights folder per session, a fresh model per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import MegActorConfig
from model.loading import build_megactor, write_tiny_weights
from model.megactor import MegActor


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("tiny_weights"), seed=0)


@pytest.fixture
def make_model(tiny_weights: Path):
    def make(**overrides) -> MegActor:
        torch.manual_seed(0)
        return build_megactor(tiny_weights, MegActorConfig(**overrides))

    return make
