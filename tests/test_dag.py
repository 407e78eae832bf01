from __future__ import annotations

import pytest

from pipeline.config import BuildConfig, StageConfig
from pipeline.dag import check_resources, stage_kwargs


def test_actor_pools_that_leave_no_room_for_tasks_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = BuildConfig(stages=[StageConfig("gaze", num_cpus=0.5, pool_size=3)], task_num_cpus=1.0)
    with pytest.raises(ValueError, match="CPU: need 2.5, cluster has 2"):
        check_resources(config, {"CPU": 2.0})
    check_resources(config, {"CPU": 2.5})
    gpu = BuildConfig(stages=[StageConfig("stylise", num_gpus=1, pool_size=2)])
    with pytest.raises(ValueError, match="GPU: need 2, cluster has 0"):
        check_resources(gpu, {"CPU": 8.0})


def test_on_a_cluster_a_shortfall_only_warns(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    check_resources(BuildConfig(stages=[StageConfig("swap", num_gpus=4)]), {"CPU": 8.0})
    assert "autoscaling cluster may still grow" in caplog.text


def test_stage_kwargs_pass_only_the_context_a_stage_accepts() -> None:
    class Stage:
        def __init__(self, weights_dir: str, seed: int = 0, frame_batch: int = 1) -> None: ...

    context = {"weights_dir": "/w", "bank_path": "/b.parquet", "seed": 3}
    assert stage_kwargs(Stage, {"frame_batch": 8, "seed": 5}, context) == {
        "weights_dir": "/w",
        "seed": 5,  # a stage option wins over the build's context
        "frame_batch": 8,
    }
