"""Shard-set statistics: the numbers, and `python -m pipeline stats` printing them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_select import cli, fake_shard_set, small_gaze_build

from pipeline import stats
from pipeline.select import run_select
from pipeline.writer import write_failures


def test_numbers_of_a_fake_shard_set(tmp_path: Path) -> None:
    fake_shard_set(tmp_path, [float(i) for i in range(10)])
    build = {"recipe": {"mix": {"real": 0.5, "swap": 0.4, "style": 0.1}}, "config": {"samples_per_shard": 2}}
    (tmp_path / "build.json").write_text(json.dumps(build))
    write_failures(
        tmp_path, [{"clip_id": "z", "dataset": "demo", "key": "", "stage": "decode", "error": "bad"}]
    )
    run_select(tmp_path, top=0.2, min_frames=1)
    data = stats.load(tmp_path)
    shares = stats.bucket_shares(data)
    assert shares.loc["real", "clips"] == 10 and shares.loc["real", "frames"] == sum(range(10, 20))
    assert shares.loc["real", "clip_share"] == 1.0 and shares.loc["swap", "target"] == 0.4
    assert stats.score_quantiles(data)[0.5] == pytest.approx(4.5)
    assert stats.subset_threshold(data) == 8.0 and stats.subset_threshold(data, "authors") is None
    assert list(stats.clip_lengths(data)) == list(range(10, 20))
    assert stats.failure_counts(data).to_dict() == {"decode/bad": 1}
    assert len(stats.shard_sizes(data.shard_stats)) == 5 and len(data.subset_stats) == 1
    assert stats.fg_backends(data).to_dict() == {"none": 10}
    text = stats.report(data)
    for expected in ("real", "50.0%", "gaze_robust_spread_deg (10 scored)", "threshold 8", "decode/bad: 1",
                     "min 10, median 14.5, max 19", "shards: 5", "fg backend: none 10"):  # fmt: skip
        assert expected in text, (expected, text)


def test_stats_count_the_train_samples_stage_2_can_use(tmp_path: Path) -> None:
    fake_shard_set(tmp_path, [1.0] * 5, splits=["train"] * 4 + ["val"], frames=[240, 181, 180, 90, 240])
    data = stats.load(tmp_path)
    assert stats.stage2_usable(data) == (2, 4)
    assert "stage-2 usable train samples (>= 181 frames): 2 of 4" in stats.report(data)


def test_stats_of_a_missing_build_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build the shards first"):
        stats.load(tmp_path)


@pytest.mark.slow
def test_stats_cli_on_a_real_build(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    out = small_gaze_build(tmp_path_factory, tmp_path / "out")
    assert cli("select", "--out", str(out), "--min-frames", "8").returncode == 0
    done = cli("stats", str(out))
    assert done.returncode == 0, done.stderr
    index = pd.read_parquet(out / "index.parquet")
    assert f"{len(index)} samples" in done.stdout and "gaze subset: 1 of" in done.stdout
    assert "failures: none" in done.stdout and "target" in done.stdout
