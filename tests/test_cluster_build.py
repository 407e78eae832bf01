"""The shard build on a real two-node Ray cluster (two raylets on loopback), and losing a node mid-build.

The output is a local folder both nodes see (they share this machine's file system, as NFS would).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from cluster_helpers import placement, two_node_cluster
from ray_helpers import PYTHON, REPO
from test_build_e2e import SMALL_DEMO, assert_contract

pytestmark = pytest.mark.slow

# One annotator actor per node: each asks for 1.5 of a node's 2 CPUs, so a pool of two cannot sit on one
# node; tasks ask for 0.5 and fit beside it. One sample per shard: many commits, so the kill lands mid-run.
# No retries: the batches in flight on the killed node's actor are lost at once (with retries Ray may
# spend them all in the seconds before it declares the node dead), so the second pass is what builds them.
FACE_MASK = [
    {"name": "face_mask", "num_cpus": 1.5, "pool_size": 2, "batch_size": 1, "max_task_retries": 0,
     "options": {"model": "bisenet", "input_size": 64, "frame_batch": 16}},
]  # fmt: skip
CLUSTER_BUILD = [
    *[o for o in SMALL_DEMO if not o.startswith(("stages=", "samples_per_shard="))],
    "samples_per_shard=1", "task_num_cpus=0.5", f"stages={json.dumps(FACE_MASK)}",
]  # fmt: skip


def committed(out: Path) -> set[str]:
    return {k for p in (out / "shards").glob("*.stats.json") for k in json.loads(p.read_text())["keys"]}


def nodes_of(found: dict[str, list[list[str]]], kind: str, word: str) -> set[str]:
    """Nodes of the actors, or of the plain tasks (not actor methods), whose name holds `word`."""
    return {
        entry[1]
        for entry in found[kind]
        if word in entry[0] and (kind == "actors" or entry[3] == "NORMAL_TASK")
    }


def test_a_build_on_two_nodes_survives_losing_one(tmp_path: Path) -> None:
    """Tasks and actors run on both nodes; SIGKILL of the second node mid-build; the same build run
    completes on the head alone (Ray Data retries the lost tasks, the pool keeps its live actor, the
    rows whose batch died with the node are built by a second pass whose pool fits the head), every
    sample exactly once and nothing partial left."""
    out = tmp_path / "out"
    args = ["--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(out), *CLUSTER_BUILD]
    with two_node_cluster(head_cpus=2, node2_cpus=2) as cluster:
        log = open(tmp_path / "build.log", "w")  # noqa: SIM115 - the child writes it
        build = subprocess.Popen(
            [PYTHON, "-m", "pipeline", "build", "--no-progress", *args],
            cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 420
            both = {cluster.head_id, cluster.node2_id}
            found: dict[str, list[list[str]]] = {"actors": [], "tasks": []}
            while time.monotonic() < deadline:  # Ray's own record of where the work runs
                assert build.poll() is None, (tmp_path / "build.log").read_text()[-4000:]
                found = placement(cluster.env)
                if nodes_of(found, "actors", "MapWorker") == both and nodes_of(found, "tasks", "Map") == both:
                    break
                time.sleep(1)
            assert nodes_of(found, "actors", "MapWorker") == both, found["actors"]
            assert nodes_of(found, "tasks", "Map") == both, found["tasks"]
            while time.monotonic() < deadline and not ((out / "shards").is_dir() and committed(out)):
                assert build.poll() is None, "the build ended before the node could be killed"
                time.sleep(0.2)
            cluster.kill_node2()
            before_kill = committed(out)
            manifest_keys = set(pd.read_parquet(out / "manifest.parquet")["key"])
            assert 0 < len(before_kill) < len(manifest_keys), "the kill should land part-way"
            assert build.wait(timeout=420) == 0, (tmp_path / "build.log").read_text()[-4000:]
        finally:
            if build.poll() is None:
                os.killpg(build.pid, 9)
    assert committed(out) - before_kill, "the head built the rest after the kill"
    samples = assert_contract(out)
    assert sorted(s["__key__"] for s in samples) == sorted(manifest_keys)  # each exactly once
    assert len(pd.read_parquet(out / "failures.parquet")) == 0
    assert "samples written" in (tmp_path / "build.log").read_text()
