"""Ray Train on a real two-node cluster (two raylets on loopback): one worker per node, checkpoints in a
folder both nodes see; a node SIGKILLed after a checkpoint, a replacement node joins, and max_failures
restarts the worker group from that checkpoint with the data position continued."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import placement, two_node_cluster
from ray_helpers import PYTHON, REPO
from test_train_e2e import TINY, read_step_log, registered_steps

from train.checkpoint import latest_checkpoint, read_train_state
from train.config import load_train_config
from train.data import make_loader

pytestmark = pytest.mark.slow

MAX_STEPS, STEPS_PER_EPOCH = 8, 3


def worker_nodes(env: dict[str, str]) -> dict[str, set[str]]:
    """Node ids of the Ray Train worker actors, by state (ALIVE / DEAD)."""
    nodes: dict[str, set[str]] = {}
    for name, node, state in placement(env)["actors"]:
        if "RayTrainWorker" in name:
            nodes.setdefault(state, set()).add(node)
    return nodes


def logged_a_step(run_dir: Path) -> bool:
    """Rank 0 has written a step line to the step log (a line being written counts once it is whole)."""
    try:
        return any("loss" in line for line in read_step_log(run_dir))
    except (OSError, json.JSONDecodeError):
        return False


def test_two_node_training_survives_losing_a_node(
    demo_out: Path, tiny_model_weights: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "train"
    run_dir = storage / "cluster"
    # Each node offers one CPU and each worker asks for one: the two workers must sit on different nodes,
    # and after the loss the group can only restart once a replacement node offers the missing CPU.
    overrides = [
        f"data.root={demo_out}", f"storage_path={storage}", "name=cluster", "num_workers=2",
        "cpus_per_worker=1", "max_failures=2", "checkpoint_every=2", f"data.steps_per_epoch={STEPS_PER_EPOCH}",
        "validation.every=0", "validation.loss_every=0", "progress=false", f"max_steps={MAX_STEPS}",
        f"model.weights_dir={tiny_model_weights}",
    ]  # fmt: skip
    with two_node_cluster(head_cpus=1, node2_cpus=1) as cluster:
        log = open(tmp_path / "train.log", "w")  # noqa: SIM115 - the child writes it
        driver = subprocess.Popen(
            [PYTHON, "jobs/stage1.py", "--config", TINY, *overrides],
            cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            # A logged step means both workers are up (a DDP step needs both ranks); only then ask Ray where
            # they sit: each state-API probe is a driver process of its own, too costly to poll with.
            while time.monotonic() < deadline and not logged_a_step(run_dir):
                assert driver.poll() is None, (tmp_path / "train.log").read_text()[-4000:]
                time.sleep(0.2)
            before = worker_nodes(cluster.env)
            assert before.get("ALIVE") == {cluster.head_id, cluster.node2_id}, before  # one worker per node
            while time.monotonic() < deadline and not registered_steps(run_dir):
                assert driver.poll() is None, (tmp_path / "train.log").read_text()[-4000:]
                time.sleep(0.2)
            assert registered_steps(run_dir), "no checkpoint was registered before the deadline"
            cluster.kill_node2()
            killed_at = max(registered_steps(run_dir))
            replacement = cluster.add_node("node3", num_cpus=1, resources={"node2": 1})
            assert driver.wait(timeout=420) == 0, (tmp_path / "train.log").read_text()[-4000:]
            after = worker_nodes(cluster.env)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, 9)
    assert after.get("ALIVE", set()) | after.get("DEAD", set()) >= {cluster.head_id, replacement}

    log_lines = read_step_log(run_dir)
    starts = [i for i, line in enumerate(log_lines) if line.get("event") == "start"]
    assert len(starts) == 2, "one start, then one restart of the worker group"
    restart = log_lines[starts[1]]
    assert restart["step"] >= killed_at and restart["step"] % 2 == 0, restart  # from a checkpoint
    assert restart["step"] < MAX_STEPS, "the kill should land before the planned end"
    assert restart["world_size"] == 2
    resumed = log_lines[starts[1] + 1 :]
    assert [line["step"] for line in resumed] == list(range(restart["step"] + 1, MAX_STEPS + 1))

    # The data position continues: rank 0 sees exactly the batches an uninterrupted run would.
    config = load_train_config("stage1", [TINY], overrides)
    expected: dict[int, list[str]] = {}
    for epoch in range(MAX_STEPS // STEPS_PER_EPOCH + 1):
        loader = make_loader(config.data, seed=config.seed, epoch=epoch, rank=0, world_size=2)
        for position, batch in enumerate(loader):
            expected[epoch * STEPS_PER_EPOCH + position + 1] = list(batch["key"])
    for line in resumed:
        assert line["keys"] == expected[line["step"]], f"step {line['step']}: wrong data position"
    state = read_train_state(latest_checkpoint(run_dir))
    assert (state.step, state.samples_seen) == (MAX_STEPS, 2 * MAX_STEPS)
