"""Start or stop a local Ray head on loopback, for `ray job submit` on one machine.

    python scripts/local_ray.py up --state out/ray-head      # prints the job address
    python scripts/local_ray.py down --state out/ray-head

`up` runs `ray start --head --block` in its own process group and records the group id; `down`
ends exactly that group. Nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TEMP_DIR = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray")  # Ray's own default


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _dashboard_answers(dashboard: str) -> bool:
    try:
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # it answers (401 until a client sends Ray's auth token): it is up
    except OSError:
        return False
    return True


def up(state: Path, port: int, dashboard_port: int, num_cpus: int | None, temp_dir: str | None) -> str:
    state.mkdir(parents=True, exist_ok=True)
    info_path = state / "head.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if _group_alive(info["pgid"]):
            return info["dashboard"]
    command = [
        _ray_executable(), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--disable-usage-stats",
    ]  # fmt: skip
    # The job agent serves `ray job submit`; the dashboard answers before it does, and a submit that
    # finds no agent within Ray's 10 s fails. Its port is chosen here so `up` can wait for it.
    agent_port = _free_port()
    command += ["--dashboard-agent-listen-port", str(agent_port)]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if temp_dir:
        command += ["--temp-dir", temp_dir]
    log = open(state / "head.log", "w")  # noqa: SIM115 - handed to the child
    # Jobs run `python ...` through the head's PATH: put this interpreter's folder (the venv) first.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    info_path.write_text(
        json.dumps(
            {
                "pgid": process.pid,
                "dashboard": dashboard,
                "gcs": f"127.0.0.1:{port}",
                "temp_dir": temp_dir or DEFAULT_TEMP_DIR,
            }
        )
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; see {state / 'head.log'}")
        if _dashboard_answers(dashboard) and _listening(agent_port):
            return dashboard
        time.sleep(1)
    down(state)
    raise TimeoutError(f"the Ray dashboard at {dashboard} or its job agent did not answer within 120 s")


def down(state: Path) -> None:
    info_path = state / "head.json"
    if not info_path.exists():
        return
    info = json.loads(info_path.read_text())
    pgid = info["pgid"]
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if not _group_alive(pgid):
            break
        os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    # `ray start` records its head in <temp dir>/ray_current_cluster and `ray.init()` without an address
    # joins what that file names: remove it when it names this (now stopped) head, as `ray stop` would.
    current = Path(info.get("temp_dir", DEFAULT_TEMP_DIR)) / "ray_current_cluster"
    port = info["gcs"].rsplit(":", 1)[1]
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    info_path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state", default="out/ray-head", help="folder for the pid file and the head's log")
    parser.add_argument("--port", type=int, default=6380)
    parser.add_argument("--dashboard-port", type=int, default=8266)
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--temp-dir", help="Ray's session folder (default /tmp/ray)")
    args = parser.parse_args(argv)
    if args.action == "up":
        print(up(Path(args.state), args.port, args.dashboard_port, args.num_cpus, args.temp_dir))
    else:
        down(Path(args.state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
