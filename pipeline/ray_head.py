"""The local Ray of a build: started in a session of its own, stopped on exit, reaped after a kill.

`ray.init()` in the driver makes Ray's processes (gcs_server, raylet, dashboard and runtime-env agents,
workers) children of the driver, in its session; a SIGKILLed driver leaves many of them running. So a
local build starts Ray in a launcher process (`python -m pipeline.ray_head`) in a new session:

* the launcher runs `ray.init(address="local")`, writes the GCS address to its state file, and waits on
  its stdin; when the driver exits in any way (SIGKILL included) the pipe closes and it shuts Ray down;
* the state file (under Ray's temp dir) records the driver's and the launcher's pid and start time; the
  launcher's pid is the session id of every process Ray starts (workers make process groups of their
  own, but stay in the session);
* the driver stops the head at exit; a later build finds state files whose driver is dead and kills
  the processes of that session (and nothing else) before it starts its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # RAY_START_TIMEOUT_S overrides it (a slow or busy machine)
STOP_GRACE_S = 5.0  # for a clean ray.shutdown in the launcher; then what is left of its session is killed


def state_dir() -> Path:
    """Where heads are recorded: next to Ray's own session folders (RAY_TMPDIR, else /tmp)."""
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "pipeline-heads"


class RayStartFailed(RuntimeError):
    """The local Ray head did not come up (the CLI prints the message alone, no traceback)."""


def start_timeout_s() -> float:
    value = os.environ.get("RAY_START_TIMEOUT_S", "")
    try:
        return float(value) if value else START_TIMEOUT_S
    except ValueError as exc:
        raise RayStartFailed(f"RAY_START_TIMEOUT_S={value!r}: expected seconds, e.g. 300") from exc


@dataclass
class Head:
    process: subprocess.Popen
    gcs: str
    state: Path


_head: Head | None = None
_stop_registered = False


def _started(pid: int) -> float | None:
    """The process's start time, None when it is gone (a zombie counts as gone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:
        return None


def _same_process(pid: int, started: float | None) -> bool:
    now = _started(pid)
    return now is not None and started is not None and abs(now - started) < 1.0


def session_members(session: int) -> list:
    """The live processes of session `session` (psutil.Process objects)."""
    import psutil

    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members


def kill_session(session: int, leader_started: float, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process of the head's session; returns how many there were.

    Linux never hands out a pid still in use as a session id, so while any process of the session lives
    the id is the head's. Its leader alive with another start time means the id was reused after the
    head's session ended: nothing of ours is left there."""
    import psutil

    leader = _started(session)
    if leader is not None and abs(leader - leader_started) >= 1.0:
        return 0
    members = session_members(session)
    for process in members:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    return len(members)


def reap_dead_builds() -> int:
    """Kill what builds whose driver is gone left running (recorded heads only); returns the process count."""
    killed = 0
    for path in sorted(state_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
            driver, session = record["driver"], record["session"]
        except (OSError, ValueError, KeyError):
            continue  # being written by a build that is starting
        if _same_process(driver["pid"], driver["started"]):
            continue  # a live build's own head
        count = kill_session(session["pid"], session["started"])
        if count:
            log.warning(
                "killed %d Ray process(es) of session %d, left running by build driver %d that died",
                count, session["pid"], driver["pid"],
            )  # fmt: skip
        killed += count
        for leftover in (path, path.with_suffix(".log")):
            leftover.unlink(missing_ok=True)
    return killed


def _wait_for_address(head: subprocess.Popen, state: Path, log_path: Path) -> str:
    timeout_s = start_timeout_s()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            gcs = json.loads(state.read_text()).get("gcs")
            if gcs:
                return gcs
        if head.poll() is not None:
            tail = log_path.read_text()[-3000:].strip()
            raise RayStartFailed(f"the local Ray head exited with {head.returncode} while starting: {tail}")
        time.sleep(0.05)
    raise RayStartFailed(
        f"the local Ray head timed out: not started within {timeout_s:g} s (a busy machine starts it slowly). "
        f"Raise the limit and rerun: RAY_START_TIMEOUT_S={max(300, 2 * timeout_s):g} <the same command>"
    )


def _token_auth_as_ray_init_would() -> None:
    """A new local Ray turns token auth on unless RAY_AUTH_MODE says otherwise; it does so in the process
    that calls ray.init. Do it here, so the launcher inherits the mode and this driver's connection uses it."""
    from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default

    enable_token_auth_by_default()


def _launcher_env() -> dict[str, str]:
    """This environment, with this checkout first on the path (the driver may run from anywhere)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def start_head(num_cpus: int | None) -> str:
    """Start (or reuse) this driver's local Ray head; returns its GCS address."""
    import atexit

    global _head, _stop_registered
    if _head is not None and _head.process.poll() is None:
        return _head.gcs
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    reap_dead_builds()
    _token_auth_as_ray_init_would()
    command = [sys.executable, "-m", "pipeline.ray_head", "--driver", str(os.getpid())]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    stamp = f"{os.getpid()}-{time.time_ns()}"
    log_path = folder / f"{stamp}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [*command, "--state", str(folder / f"{stamp}.json")],
            stdin=subprocess.PIPE,  # closed when this process exits: the head's signal to stop
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_launcher_env(),
        )
    state = folder / f"{stamp}.json"
    head = Head(process, "", state)
    if _head is None and not _stop_registered:
        atexit.register(stop_head)
        _stop_registered = True
    _head = head
    try:
        head.gcs = _wait_for_address(process, state, log_path)
    except BaseException:
        stop_head()
        raise
    log.info("local Ray head started (session %d, GCS %s)", process.pid, head.gcs)
    return head.gcs


def stop_head() -> None:
    """Disconnect, let the launcher shut Ray down, then kill whatever of its session is left."""
    import ray

    global _head
    head, _head = _head, None
    if head is None:
        return
    if ray.is_initialized():
        ray.shutdown()
    with contextlib.suppress(OSError):
        head.process.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=STOP_GRACE_S)
    record = json.loads(head.state.read_text())["session"] if head.state.exists() else None
    if record is not None:
        kill_session(record["pid"], record["started"], grace_s=2.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=5)
    head.state.unlink(missing_ok=True)
    head.state.with_suffix(".log").unlink(missing_ok=True)


def _record(state: Path, driver: int, gcs: str) -> None:
    """The state file, atomically: the driver and this session, with start times."""
    me = os.getpid()
    record = {
        "driver": {"pid": driver, "started": _started(driver)},
        "session": {"pid": me, "started": _started(me)},
        "gcs": gcs,
    }
    temp = state.with_suffix(".tmp")
    temp.write_text(json.dumps(record))
    os.replace(temp, state)


def _serve(num_cpus: int | None, state: Path, driver: int) -> None:
    """The launcher: Ray up, the address recorded, then wait for the driver to go."""
    import ray

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # ray's atexit hook then shuts it down
    _record(state, driver, "")  # before Ray starts: a driver killed now still leaves a record of this session
    ray.init(
        address="local",  # never join a head that `ray start` once recorded in /tmp/ray
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    _record(state, driver, ray.get_runtime_context().gcs_address)
    while os.getppid() == driver:  # reparented: the driver is gone even if a child holds the pipe
        if select.select([sys.stdin], [], [], 5.0)[0] and not sys.stdin.buffer.read1(1024):
            break  # EOF: the driver exited, or closed the pipe to stop this head
    ray.shutdown()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the local Ray head of one build driver")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--driver", type=int, required=True, help="the build driver's pid")
    args = parser.parse_args()
    _serve(args.num_cpus, args.state, args.driver)
