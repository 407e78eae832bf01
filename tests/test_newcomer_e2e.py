"""Runs that fail fast and stop cleanly, through the real entry points: Ctrl-C of a build, a Ray head that
does not start in time, a training job whose ScalingConfig the machine cannot give."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from lookalike import REPO
from test_build_e2e import SMALL_DEMO

pytestmark = pytest.mark.slow

PYTHON = sys.executable
# One sample per shard, one CPU and one real annotator (face masks on tiny weights): commits spread over
# the build, so the interrupt lands mid-run. Without a stage a sample takes ~0.2 s and every commit can
# land between the first one and the signal.
SLOW_DEMO = [*SMALL_DEMO, "samples_per_shard=1", "num_cpus=1", "profile=tiny",
             "stages=[{name: face_mask, num_cpus: 0.05, options: {model: bisenet, input_size: 128, frame_batch: 8}}]"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "demo"


def build_command(root: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "pipeline", "build", "--dataset", "demo", "--root", str(root), "--out", str(out)]


def committed(out: Path) -> set[str]:
    return {k for p in (out / "shards").glob("*.stats.json") for k in json.loads(p.read_text())["keys"]}


def as_a_terminal_starts_it() -> None:
    """In the child before exec: SIGINT unblocked and at its default, as a shell's foreground job has it
    (an ignored or blocked signal survives exec, and this pytest process may have either from an earlier
    test)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.own_process
def test_ctrl_c_prints_one_resume_line_and_exits_130_then_the_rerun_finishes(
    demo_root: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "out", tmp_path / "build.log"
    with open(log, "w") as handle:  # a file, as under nohup or Slurm
        process = subprocess.Popen(
            [*build_command(demo_root, out), *SLOW_DEMO], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,  # setsid: its own process group, as a terminal's foreground job
            preexec_fn=as_a_terminal_starts_it,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((out / "shards").glob("*.stats.json")):
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        started = time.monotonic()
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert time.monotonic() - started < 30
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    lines = [line for line in text.splitlines() if "interrupted" in line]
    assert len(lines) == 1, text[-3000:]
    found = re.search(
        r"interrupted: (\d+) of (\d+) samples committed; run the same command to finish", lines[0]
    )
    assert found, lines[0]
    planned = len(pd.read_parquet(out / "manifest.parquet"))
    assert int(found[2]) == planned and 0 < int(found[1]) <= len(committed(out)) < planned

    rerun = subprocess.run(
        [*build_command(demo_root, out), *SLOW_DEMO, "--no-progress"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(committed(out)) == planned


def ray_head_launchers() -> set[int]:
    return {
        p.pid for p in psutil.process_iter(["cmdline"]) if "pipeline.ray_head" in (p.info["cmdline"] or [])
    }


def test_a_ray_start_timeout_is_one_line_naming_the_setting(demo_root: Path, tmp_path: Path) -> None:
    """In its own process: an in-process run would share (and could leave behind) this process's Ray."""
    before = ray_head_launchers()
    env = {**os.environ, "RAY_START_TIMEOUT_S": "0.01"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [*build_command(demo_root, tmp_path / "out"), *SLOW_DEMO, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "ERROR" in line or line.startswith("error")]
    assert len(errors) == 1 and "timed out" in errors[0] and "RAY_START_TIMEOUT_S=" in errors[0], output[
        -3000:
    ]
    assert "Traceback" not in output
    time.sleep(2)
    assert not ray_head_launchers() - before  # the head that did not start in time is stopped


def committed_shard_folder(root: Path) -> Path:
    """A shard folder as the data contract defines it: a tar and its `.stats.json` commit marker naming
    the split (only the marker is read before any worker starts)."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    with tarfile.open(shards / "shard-0001.tar", "w"):
        pass
    stats = {"shard": "shard-0001.tar", "split": "train", "samples": 0, "keys": []}
    (shards / "shard-0001.stats.json").write_text(json.dumps(stats))
    return root


def test_a_training_job_that_asks_for_more_than_the_machine_fails_fast_naming_the_fix(tmp_path: Path) -> None:
    root = committed_shard_folder(tmp_path / "data")
    started = time.monotonic()
    result = subprocess.run(
        [PYTHON, "jobs/stage1.py", "--config", "configs/train/tiny.yaml", f"data.root={root}",
         f"storage_path={tmp_path / 'train'}", "num_workers=64", "use_gpu=true"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert elapsed < 60, elapsed
    assert "Traceback" not in result.stderr and "WorkerGroupStartupTimeoutError" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "GPU: need 64, cluster has" in errors[0]
    assert "num_workers=1 use_gpu=false" in errors[0] or "num_workers=" in errors[0].split("Fix:")[1]
