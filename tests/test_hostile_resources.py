"""Resources the cluster does not have, and a build driver killed with its Ray running.

Through the real CLI: stages that ask for GPUs on a machine without any (CUDA_VISIBLE_DEVICES empty: Ray
counts no GPU) stop the build with one clear error instead of a wait without end; a killed driver's Ray
processes do not outlive the next build.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ray_helpers import PYTHON, RAY, REPO

from pipeline.config import BuildConfig, StageConfig
from pipeline.dag import check_resources
from pipeline.identity_bank import BankPool
from pipeline.resources import ResourceShortfall, require

SMALL_DEMO = [
    "demo.identities=3", "demo.vfhq_clips=3", "demo.celebvhq_clips=3", "demo.min_frames=20",
    "demo.max_frames=40", "max_frames=24", "min_frames=8", "resolution=128", "samples_per_shard=2",
]  # fmt: skip
GPU_GAZE = "stages=[{name: gaze, num_gpus: 0.5, num_cpus: 0.5, options: {input_size: 224}}]"
GPU_SWAP = "stages=[{name: swap, num_gpus: 0.15, num_cpus: 0.5}]"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}  # a machine without GPUs, as Ray sees it


def _build(tmp: Path, *overrides: str, env: dict[str, str], timeout: float = 180, out: str = "out"):
    command = [PYTHON, "-m", "pipeline", "build", "--no-progress", "--dataset", "demo"]
    command += ["--root", str(tmp / "demo"), "--out", str(tmp / out), *SMALL_DEMO, *overrides]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return result, time.monotonic() - started


# -- the shared check, on resources a test states (what Ray's nodes report) --------------------------


def test_a_gpu_stage_on_a_cpu_node_names_the_stage_the_need_and_the_fix(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = BuildConfig(stages=[StageConfig("gaze", num_gpus=0.5), StageConfig("face_mask")])
    with pytest.raises(ResourceShortfall) as info:
        check_resources(config, {"CPU": 16.0})
    message = str(info.value)
    assert "GPU: need 0.5, cluster has 0" in message
    assert "gaze (0.5 x 1)" in message and "face_mask" not in message.split("Fix:")[1]
    assert "num_gpus: 0" in message


def test_an_actor_no_single_node_can_hold_is_refused(monkeypatch) -> None:
    """Two 2-CPU nodes hold 4 CPUs, yet no node holds one 3-CPU actor."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = BuildConfig(stages=[StageConfig("gaze", num_cpus=3)], task_num_cpus=0.5)
    with pytest.raises(
        ResourceShortfall, match="one actor needs 3 CPU on one node, the largest node has 2 CPU"
    ):
        check_resources(config, [{"CPU": 2.0}, {"CPU": 2.0}])
    check_resources(config, [{"CPU": 2.0}, {"CPU": 4.0}])


def test_the_identity_bank_pool_is_checked_with_the_swap_stage_named(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ResourceShortfall) as info:
        require(BankPool(num_gpus=0.15).demand(), 600, nodes=lambda: [{"CPU": 2.0}])
    assert "identity-bank pass (stage swap" in str(info.value)
    assert "GPU: need 0.15, cluster has 0" in str(info.value)
    require(BankPool(num_gpus=0.15).demand(), 600, nodes=lambda: [{"CPU": 2.0, "GPU": 1.0}])


def test_on_a_cluster_the_check_waits_for_nodes_to_appear(monkeypatch) -> None:
    """An autoscaler adds a GPU node during the wait: the pass goes on."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # only read as "on a cluster"
    seen = [[{"CPU": 8.0}], [{"CPU": 8.0}], [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}]]
    calls = []

    def nodes() -> list[dict[str, float]]:
        calls.append(1)
        return seen[min(len(calls), len(seen)) - 1]

    require(BankPool(num_gpus=0.15).demand(), 30, nodes=nodes, poll_s=0.05)
    assert len(calls) == 3


# -- through the CLI --------------------------------------------------------------------------------


def test_a_stage_asking_for_gpus_on_a_machine_without_any_exits_2_within_a_minute(tmp_path: Path) -> None:
    result, seconds = _build(tmp_path, GPU_GAZE, env=_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert seconds < 60
    error = [line for line in result.stderr.splitlines() if " ERROR pipeline" in line]
    assert len(error) == 1, result.stderr[-3000:]
    assert "the DAG" in error[0] and "gaze" in error[0]
    assert "GPU: need 0.5, cluster has 0" in error[0] and "num_gpus: 0" in error[0]


def test_a_swap_stage_asking_for_gpus_exits_2_before_the_identity_bank_starts(tmp_path: Path) -> None:
    """The swap stage's bank pass runs before the DAG and asks for the swap stage's GPUs."""
    result, seconds = _build(tmp_path, GPU_SWAP, env=_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert seconds < 60
    assert "swap (0.15 x 1)" in result.stderr and "GPU: need 0.15, cluster has 0" in result.stderr
    assert not (tmp_path / "out" / "identities.parquet").exists()


def test_the_identity_bank_pass_itself_is_checked_on_a_real_ray(tmp_path: Path, monkeypatch) -> None:
    """build_identity_bank on a pool that asks for a GPU, on a local Ray without any: an error at once."""
    import ray
    from swap_helpers import make_manifest

    from pipeline.dag import init_ray
    from pipeline.identity_bank import build_identity_bank
    from pipeline.ray_head import stop_head
    from pipeline.stages.face_swap import ARCFACE, INSWAPPER, SCRFD
    from pipeline.weights import ensure_tiny_weights

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    weights = ensure_tiny_weights(tmp_path / "weights", [SCRFD, ARCFACE, INSWAPPER])
    manifest = make_manifest(tmp_path / "clips", [dict(clip_id="a0", identity=0, num_frames=6)])
    assert not ray.is_initialized()
    init_ray(1)
    try:
        pool = BankPool(num_cpus=0.5, num_gpus=0.15)
        with pytest.raises(ResourceShortfall, match="identity-bank pass.*GPU: need 0.15, cluster has 0"):
            build_identity_bank(manifest, 128, 1.8, weights, tmp_path / "identities.parquet", pool=pool)
    finally:
        stop_head()
    assert not (tmp_path / "identities.parquet").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_session(session: int) -> None:
    """SIGKILL a head started with setsid: its group and the workers' groups in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session, signal.SIGKILL)
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == session:
                process.kill()
                members.append(process)
    psutil.wait_procs(members, timeout=30)


@contextlib.contextmanager
def cpu_only_head() -> Iterator[dict[str, str]]:
    """A one-node Ray cluster without GPUs, in a session of its own; yields a driver's env for it."""
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = _env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    ports = {
        "--port": port, "--ray-client-server-port": _free_port(), "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(), "--metrics-export-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }  # fmt: skip
    command = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0"]
    command += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir]
    command += [str(item) for pair in ports.items() for item in pair]
    head = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = head.communicate(timeout=120)
        assert head.returncode == 0, output[-3000:]
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        _kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_on_a_cluster_a_shortfall_waits_resource_wait_s_then_exits_2(tmp_path: Path) -> None:
    with cpu_only_head() as env:
        result, seconds = _build(tmp_path, GPU_GAZE, "resource_wait_s=3", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "waiting up to 3 s (resource_wait_s)" in result.stderr  # the warning came first
    assert "GPU: need 0.5, cluster has 0" in result.stderr
    assert "Waited 3 s for the cluster to grow" in result.stderr
    assert seconds < 90


# -- a killed driver's Ray ----------------------------------------------------------------------------


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (is_running also checks the start time: a reused pid is not ours)."""
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _start_build_until_ray_is_up(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    """A demo build through the CLI, returned once its Ray is up (it has checked its nodes), with the
    seconds that took."""
    command = [PYTHON, "-m", "pipeline", "build", "--no-progress", "--dataset", "demo"]
    command += ["--root", str(tmp_path / "demo"), "--out", str(tmp_path / "out"), *SMALL_DEMO, "stages=[]"]
    started = time.monotonic()
    driver = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for line in driver.stderr:
        if "Ray node(s) see" in line:
            break
    return driver, time.monotonic() - started


@pytest.mark.slow
def test_a_rerun_kills_what_a_killed_build_left_and_completes(tmp_path: Path) -> None:
    """SIGKILL the driver and its direct children (the launcher of its Ray) once Ray is up, as a
    preemption of the driver's processes would: Ray's other processes are left behind. The rerun kills
    them (and only them) before it starts its own Ray, completes, and leaves no process running."""
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # this test's Ray temp dir and head records
    env = _env(RAY_TMPDIR=ray_tmp)
    driver, ready_s = _start_build_until_ray_is_up(tmp_path, env)
    tree: list[psutil.Process] = []
    try:
        tree = psutil.Process(driver.pid).children(recursive=True)
        direct = psutil.Process(driver.pid).children()
        for process in [psutil.Process(driver.pid), *direct]:
            process.kill()
        driver.wait(timeout=30)
        psutil.wait_procs(direct, timeout=30)
        left = _alive(tree)
        print(f"Ray ready {ready_s:.1f} s after the CLI started; {len(left)} of {len(tree)} processes left")

        result, _ = _build(tmp_path, "stages=[]", env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "samples written" in result.stderr
        assert _alive(tree) == [], [p.name() for p in _alive(tree)]
        assert list((Path(ray_tmp) / "ray" / "pipeline-heads").glob("*.json")) == []  # the rerun's own: gone
    finally:
        for process in _alive(tree):  # only what this test's build started
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        driver.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_killed_driver_takes_its_ray_with_it(tmp_path: Path) -> None:
    """SIGKILL the driver alone once Ray is up: no process it started outlives it by more than a minute."""
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = _env(RAY_TMPDIR=ray_tmp)
    driver, _ = _start_build_until_ray_is_up(tmp_path, env)
    tree: list[psutil.Process] = []
    try:
        tree = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()
        driver.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert _alive(alive) == [], [p.name() for p in _alive(alive)]
    finally:
        for process in _alive(tree):
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        driver.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_dag_is_checked_before_the_identity_bank_does_its_work(tmp_path: Path) -> None:
    """The bank pass fits, the DAG after it does not: the build stops before embedding anything."""
    stages = "stages=[{name: swap, num_cpus: 0.5}, {name: gaze, num_gpus: 0.5, options: {input_size: 224}}]"
    result, seconds = _build(tmp_path, stages, env=_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the DAG" in result.stderr and "GPU: need 0.5, cluster has 0" in result.stderr
    assert not (tmp_path / "out" / "identities.parquet").exists()
    assert seconds < 60
