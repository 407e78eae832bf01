"""Train configs: the stage files, overlays and key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import CONFIG_DIR, load_train_config


def test_stage_files_differ_where_the_paper_says() -> None:
    stage1, stage2 = load_train_config("stage1"), load_train_config("stage2")
    assert (stage1.data.stride, stage2.data.stride) == (2, 12)
    assert (stage1.data.num_frames, stage2.data.num_frames) == (16, 16)
    assert (stage1.data.shards, stage2.data.shards) == ("shards", "gaze/shards")
    assert stage1.model.init_from is None and stage2.model.init_from == "stage1"
    trainable = stage2.megactor_config().trainable
    assert trainable["stage2"] != trainable["stage1"]


def test_tiny_overlay_and_overrides_layer_in_order() -> None:
    config = load_train_config(
        "stage2", [CONFIG_DIR / "tiny.yaml"], ["data.batch_size=3", "optim.lr=2e-4", "name=run-a"]
    )
    assert config.model.profile == "tiny" and config.data.stride == 12  # the overlay keeps the stage's stride
    assert (config.data.batch_size, config.optim.lr, config.name) == (3, 2e-4, "run-a")
    assert config.data.shards == "gaze/shards" and config.data.resolution == 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.bogus=1"], "unknown keys"),
        (["strategy=zero3"], "strategy"),
        (["mixed_precision=fp16"], "mixed_precision"),
        (["model.config.reference_blocks=some"], "reference_blocks"),
        (["model.config.not_a_field=1"], "unknown MegActorConfig fields"),
        (["checkpoint_every=0"], "checkpoint_every"),
        (["checkpoint_moments=fp16"], "checkpoint_moments"),
        (["export_every=1500"], "not a multiple of checkpoint_every"),
        # stage 1 keeps 3 checkpoints 1000 steps apart: an export every 4000 would be pruned at 7000
        (["export_every=4000"], "raise keep_checkpoints to 4"),
        (["checkpoint_every=500"], "lower export_every"),
    ],
)
def test_bad_values_are_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_train_config("stage1", overrides=overrides)


def test_missing_overlay_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_train_config("stage1", [tmp_path / "nope.yaml"])


def test_rarer_exports_are_accepted_while_the_newest_outlives_pruning() -> None:
    config = load_train_config("stage1", overrides=["export_every=4000", "keep_checkpoints=4"])
    assert (config.export_every, config.checkpoint_moments) == (4000, "bf16")
    assert load_train_config("stage1", [CONFIG_DIR / "tiny.yaml"]).export_every == 0
