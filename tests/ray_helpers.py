"""Processes for the end-to-end tests: a loopback Ray head for `ray job submit`, and killing a job whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RAY = str(Path(PYTHON).with_name("ray"))


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a driver and every Ray process it started, as a scheduler preempting the job would
    (Ray workers sit in process groups of their own)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


@contextlib.contextmanager
def loopback_head(state: Path, port: int, dashboard_port: int) -> Iterator[tuple[str, dict[str, str], Path]]:
    """`scripts/local_ray.py up` for the block, `down` after it: yields (job address, env, Ray temp dir).

    The env is what `ray job submit` runs with, as in CI: the venv is not on PATH, yet the job's `python`
    must be the venv's (local_ray.py puts it first on the head's PATH).
    """
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    helper = [PYTHON, "scripts/local_ray.py"]
    venv_bin = str(Path(PYTHON).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=path)
    ports = ["--port", str(port), "--dashboard-port", str(dashboard_port)]
    up = subprocess.run(
        [*helper, "up", "--state", str(state), *ports, "--num-cpus", "2", "--temp-dir", temp_dir],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield up.stdout.strip(), env, Path(temp_dir)
    finally:
        subprocess.run([*helper, "down", "--state", str(state)], cwd=REPO, timeout=60)
