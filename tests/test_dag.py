from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import probe_stages
import pytest

from pipeline.config import CONFIG_DIR, BuildConfig, StageConfig, load_build_config
from pipeline.dag import annotate, check_resources, plan_pools, stage_kwargs


def test_actor_pools_that_leave_no_room_for_tasks_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = BuildConfig(stages=[StageConfig("gaze", num_cpus=0.5, pool_size=3)], task_num_cpus=1.0)
    with pytest.raises(ValueError, match="CPU: need 2.5, cluster has 2"):
        check_resources(config, {"CPU": 2.0})
    check_resources(config, {"CPU": 2.5})
    gpu = BuildConfig(stages=[StageConfig("stylise", num_gpus=1, pool_size=2)])
    with pytest.raises(ValueError, match="GPU: need 2, cluster has 0"):
        check_resources(gpu, {"CPU": 8.0})


def test_a_later_pass_needs_one_actor_per_pool_not_the_full_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a node is lost the rows it held are built again on what is left: one actor per pool."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = BuildConfig(stages=[StageConfig("gaze", num_cpus=1.5, pool_size=2)], task_num_cpus=0.5)
    with pytest.raises(ValueError, match="CPU: need 3.5, cluster has 2"):
        check_resources(config, {"CPU": 2.0})
    check_resources(config, {"CPU": 2.0}, elastic=True)
    with pytest.raises(ValueError, match="lost_row_passes must be >= 0"):
        BuildConfig(lost_row_passes=-1).validate()


def test_on_a_cluster_a_shortfall_warns_then_errors_after_resource_wait_s(
    monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    config = BuildConfig(stages=[StageConfig("swap", num_gpus=4)], resource_wait_s=0.2)
    with pytest.raises(ValueError, match="GPU: need 4, cluster has 0.*Waited 0.2 s"):
        check_resources(config, {"CPU": 8.0})
    assert "waiting up to 0.2 s (resource_wait_s)" in caplog.text


def test_stage_kwargs_pass_only_the_context_a_stage_accepts() -> None:
    class Stage:
        def __init__(self, weights_dir: str, seed: int = 0, frame_batch: int = 1) -> None: ...

    context = {"weights_dir": "/w", "bank_path": "/b.parquet", "seed": 3}
    assert stage_kwargs(Stage, {"frame_batch": 8, "seed": 5}, context) == {
        "weights_dir": "/w",
        "seed": 5,  # a stage option wins over the build's context
        "frame_batch": 8,
    }


def test_by_default_one_actor_runs_every_stage_with_their_summed_resources() -> None:
    stages = [
        StageConfig("face_mask", num_gpus=0.15, num_cpus=1),
        StageConfig("swap", num_gpus=0.3, num_cpus=0.5),
    ]
    (pool,) = plan_pools(BuildConfig(stages=stages))
    assert [s.name for s in pool.stages] == ["face_mask", "swap"]
    assert (pool.size, pool.num_cpus, pool.num_gpus, pool.gpu_shares) == (1, 1.5, 0.45, (0.15, 0.3))
    old = plan_pools(BuildConfig(stages=stages, chain_stages="none"))
    assert [(p.name, p.num_gpus) for p in old] == [("face_mask", 0.15), ("swap", 0.3)]


def test_common_chains_the_all_bucket_annotators_and_keeps_the_reservation() -> None:
    config = load_build_config("vfhq", config_path=CONFIG_DIR / "cluster-8gpu.yaml")
    pools = plan_pools(config)
    assert [p.name for p in pools] == ["face_mask+foreground+gaze", "swap", "stylise"]
    chain = pools[0]
    # 2 x 0.25 + 5 x 0.5 + 2 x 0.125 GPUs spread over the largest pool (5): each stage's cap is its part.
    assert (chain.size, chain.num_gpus, chain.gpu_shares) == (5, 0.65, (0.1, 0.5, 0.05))
    before = sum(s.num_gpus * s.pool_size for s in config.stages)
    assert sum(p.num_gpus * p.size for p in pools) == pytest.approx(before)
    # Chaining all five would need 1.55 GPUs per actor: Ray takes fractions only up to one.
    with pytest.raises(ValueError, match="1.55 GPUs"):
        plan_pools(dataclasses.replace(config, chain_stages="all"))


def test_check_resources_counts_the_chained_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    stages = [
        StageConfig("face_mask", num_cpus=0.5, pool_size=2),
        StageConfig("gaze", num_cpus=0.5, pool_size=2),
    ]
    with pytest.raises(ValueError, match="CPU: need 2.5, cluster has 2"):
        check_resources(BuildConfig(stages=stages, task_num_cpus=0.5), {"CPU": 2.0})


def test_the_demo_chains_every_annotator_in_two_actors_and_fits_one_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One chained actor ran the 2-core demo 1.32x slower than five pools (benchmarks/RESULTS.md): the
    demo's chain has two actors, and a `num_cpus=1` build (tests/test_build_e2e.py) still fits."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_build_config("demo")
    (pool,) = plan_pools(config)
    assert len(pool.stages) == 5 and pool.size == 2
    check_resources(config, {"CPU": 1.0})


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.cloudpickle.register_pickle_by_value(probe_stages)  # workers cannot import tests/
    yield
    ray.shutdown()


def _probe_run(
    tmp_path: Path, chain: str
) -> tuple[dict[str, list[str]], dict[str, set[int]], dict[str, int]]:
    """Rows of each bucket (and a failed one) through three probe stages; returns each row's annotations,
    the processes that saw it, and the number of times each stage saw a row."""
    import ray

    log = tmp_path / f"{chain}.jsonl"
    stages = [
        StageConfig(name, num_cpus=0.2, options={"log": str(log)})
        for name in ("probe_mask", "probe_gaze", "probe_swap")
    ]
    config = BuildConfig(stages=stages, chain_stages=chain)
    rows = [
        {"key": f"{bucket}-{i}", "bucket": bucket, "frames": np.full((2, 4, 4, 3), i, np.uint8),
         "error_stage": "decode" if bucket == "failed" else "", "error": "", "message": "", "timings": "{}",
         "annotations": "[]"}
        for bucket in ("real", "swap", "style", "failed") for i in range(2)
    ]  # fmt: skip
    out = annotate(ray.data.from_items(rows, override_num_blocks=len(rows)), config, {}).take_all()
    annotations = {row["key"]: json.loads(row["annotations"]) for row in out}
    assert {row["key"]: int(row["frames"].max()) for row in out} == {
        row["key"]: int(row["frames"].max()) for row in rows
    }
    pids: dict[str, set[int]] = {}
    seen: dict[str, int] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        pids.setdefault(record["key"], set()).add(record["pid"])
        seen[record["stage"]] = seen.get(record["stage"], 0) + 1
    return annotations, pids, seen


def test_rows_reach_one_actor_and_only_their_buckets_stages(local_ray, tmp_path: Path) -> None:
    annotations, pids, seen = _probe_run(tmp_path, "all")
    assert annotations["swap-0"] == ["probe_mask", "probe_gaze", "probe_swap"]
    assert annotations["real-1"] == annotations["style-0"] == ["probe_mask", "probe_gaze"]
    assert annotations["failed-0"] == []  # passed through untouched, on its way to the writer
    assert len(annotations) == 8
    # Every row's stages ran in one process: its frames entered one actor, not one per stage.
    assert {key: len(p) for key, p in pids.items()} == {key: 1 for key in annotations}
    # The plan before chaining: each row visits every stage's own actor, the swap one included.
    annotations_old, pids_old, seen_old = _probe_run(tmp_path, "none")
    assert annotations_old == annotations
    assert {key: len(p) for key, p in pids_old.items()} == {key: 3 for key in annotations}
    assert seen_old == seen == {"probe_mask": 8, "probe_gaze": 8, "probe_swap": 8}
