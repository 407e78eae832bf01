"""A real two-node Ray cluster on loopback for the multi-node tests.

`two_node_cluster()` starts a head (`ray start --head`) and a second node (`ray start --address`) as two
raylets on 127.0.0.1, each in a process group of its own, and stops exactly those groups afterwards.
The second node carries a custom resource (`{"node2": 1}`) so work can be pinned to it, and
`cluster.kill_node2()` SIGKILLs its whole process group, as a preemption or host OOM kill would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from ray_helpers import PYTHON, RAY, REPO

# GCS health checks: a raylet that stops answering is declared dead after period x threshold (defaults
# 3 s x 5), so a killed node is noticed in ~3 s instead of ~15 s.
HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@dataclasses.dataclass(frozen=True)
class NodePorts:
    """Every port a raylet opens, explicit so the tests stay inside their port range."""

    node_manager: int
    object_manager: int
    metrics: int
    agent_listen: int
    agent_grpc: int
    runtime_env: int
    min_worker: int
    max_worker: int

    def args(self) -> list[str]:
        return [
            "--node-manager-port", str(self.node_manager), "--object-manager-port", str(self.object_manager),
            "--metrics-export-port", str(self.metrics), "--dashboard-agent-listen-port", str(self.agent_listen),
            "--dashboard-agent-grpc-port", str(self.agent_grpc), "--runtime-env-agent-port", str(self.runtime_env),
            "--min-worker-port", str(self.min_worker), "--max-worker-port", str(self.max_worker),
        ]  # fmt: skip


# This project's test range: GCS 6440-6449, dashboard 8440-8449, everything else 10440-10599. Every
# worker and every driver (the tests' probes too) holds a port of its node's worker range while it lives:
# the head's 15 ports once ran out mid-build ("No available ports"), so the head has 50.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6440, 8440, 10440
HEAD_PORTS = NodePorts(10441, 10442, 10443, 10444, 10445, 10446, 10500, 10549)
NODE2_PORTS = NodePorts(10447, 10448, 10449, 10450, 10451, 10452, 10550, 10579)
SPARE_PORTS = NodePorts(10453, 10454, 10455, 10456, 10457, 10458, 10580, 10599)


@dataclasses.dataclass
class Cluster:
    address: str  # GCS address, for RAY_ADDRESS / ray.init
    env: dict[str, str]  # what a driver process runs with (RAY_ADDRESS, token auth, PYTHONPATH)
    temp_dir: Path
    head_id: str
    node2_id: str
    groups: dict[str, subprocess.Popen]

    def kill_node2(self) -> None:
        """SIGKILL the second node: its process group (raylet, object store, agents) and its workers."""
        _kill_group(self.groups["node2"])

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> str:
        """Start another node (a replacement for a lost one); returns its node id once it is alive."""
        before = {n["NodeID"] for n in alive_nodes(self.env)}
        self.groups[name] = _start_node(self, name, SPARE_PORTS, num_cpus, resources)
        return _wait_for_new_node(self.env, before, self.temp_dir / f"{name}.log", self.groups[name])


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a node: its process group and every process under it (Ray puts workers in groups of
    their own, still children of the node's raylet), as losing the machine would."""
    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def alive_nodes(env: dict[str, str]) -> list[dict]:
    """The cluster's alive nodes (a fresh driver process: the tests' own process never joins Ray)."""
    code = (
        "import json, ray; ray.init(log_to_driver=False); "
        "print('NODES=' + json.dumps([{k: n[k] for k in ('NodeID', 'Resources', 'Alive')} for n in ray.nodes() "
        "if n['Alive']]))"
    )
    result = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"listing nodes failed: {result.stderr[-2000:]}")
    return _marked_json(result.stdout, "NODES=")


def _marked_json(stdout: str, marker: str):
    """The JSON a probe printed after `marker` (Ray may print its own lines to stdout too)."""
    lines = [line for line in stdout.splitlines() if line.startswith(marker)]
    if not lines:
        raise RuntimeError(f"the probe printed no {marker} line: {stdout[-2000:]}")
    return json.loads(lines[-1][len(marker) :])


def _wait_for_new_node(
    env: dict[str, str], before: set[str], log: Path, process: subprocess.Popen, timeout: float = 180
) -> str:
    """The id of a node that joined since `before`; a clear error when `ray start` exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(RuntimeError):  # the GCS may not answer yet
            new = [n["NodeID"] for n in alive_nodes(env) if n["NodeID"] not in before]
            if new:
                return new[0]
        time.sleep(1)
    raise TimeoutError(f"no new Ray node joined within {timeout} s; see {log}")


def _start_node(
    cluster: Cluster | None,
    name: str,
    ports: NodePorts,
    num_cpus: int,
    resources: dict[str, float],
    env: dict[str, str] | None = None,
    temp_dir: Path | None = None,
) -> subprocess.Popen:
    env = env if env is not None else cluster.env
    temp_dir = temp_dir if temp_dir is not None else cluster.temp_dir
    command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    if name == "head":
        command += [
            "--head", "--port", str(GCS_PORT), "--ray-client-server-port", str(CLIENT_PORT),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT),
            "--temp-dir", str(temp_dir),
        ]  # fmt: skip
    else:
        command += ["--address", f"127.0.0.1:{GCS_PORT}"]
    command += ["--num-cpus", str(num_cpus), "--num-gpus", "0", "--resources", json.dumps(resources)]
    command += ports.args()
    log = open(temp_dir / f"{name}.log", "w")  # noqa: SIM115 - handed to the child
    # Workers inherit the node's env: with RAY_ADDRESS, Ray's own helpers that look the cluster up (Ray
    # Train's placement-group cleaner) find this one, not every head running on the machine.
    node_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{GCS_PORT}")
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=node_env
    )


@contextlib.contextmanager
def two_node_cluster(
    head_cpus: int = 1, node2_cpus: int = 1, extra_env: dict[str, str] | None = None
) -> Iterator[Cluster]:
    """A head and a second node on 127.0.0.1 for the block; only their own process groups are stopped.

    The head carries `{"head": 1}`, the second node `{"node2": 1}`: a task or actor asking for a share of
    either lands on that node.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))  # short: socket paths have a length limit
    venv_bin = str(Path(PYTHON).parent)
    env = dict(
        os.environ,
        **HEALTH_CHECK,
        **(extra_env or {}),
        RAY_AUTH_MODE="token",
        # The cluster's own token, handed to every node and driver (nothing written under ~/.ray).
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    groups: dict[str, subprocess.Popen] = {}
    cluster: Cluster | None = None
    try:
        groups["head"] = _start_node(None, "head", HEAD_PORTS, head_cpus, {"head": 1}, env, temp_dir)
        env["RAY_ADDRESS"] = f"127.0.0.1:{GCS_PORT}"
        head_id = _wait_for_new_node(env, set(), temp_dir / "head.log", groups["head"])
        groups["node2"] = _start_node(None, "node2", NODE2_PORTS, node2_cpus, {"node2": 1}, env, temp_dir)
        node2_id = _wait_for_new_node(env, {head_id}, temp_dir / "node2.log", groups["node2"])
        cluster = Cluster(env["RAY_ADDRESS"], env, temp_dir, head_id, node2_id, groups)
        yield cluster
    finally:
        for name in sorted(groups, key=lambda n: n == "head"):  # the head last
            _kill_group(groups[name])  # test teardown: nothing to save, so no graceful stop
        shutil.rmtree(temp_dir, ignore_errors=True)


PLACEMENT_PROBE = """
import json, ray
from ray.util.state import list_actors, list_tasks
ray.init(log_to_driver=False)
actors = [[a.class_name, a.node_id, a.state] for a in list_actors(limit=10000)]
tasks = [[t.name, t.node_id, t.state, t.type] for t in list_tasks(limit=10000) if t.node_id]
print("PLACEMENT=" + json.dumps({"actors": actors, "tasks": tasks}))
"""


def placement(env: dict[str, str]) -> dict[str, list[list[str]]]:
    """Every actor (class, node id, state) and task (name, node id, state, type: NORMAL_TASK, ACTOR_TASK,
    ...) the cluster's state API knows,
    dead ones included: where work ran, from Ray itself rather than from the code under test."""
    result = subprocess.run(
        [PYTHON, "-c", PLACEMENT_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"the state API probe failed: {result.stderr[-2000:]}")
    return _marked_json(result.stdout, "PLACEMENT=")
