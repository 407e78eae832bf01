"""The README's CPU tour runs as printed, on a copy of the repository with nothing built yet.

The commands are read from the README itself (the fenced block under "A ten-minute tour on a CPU"), run in
order with the venv first on PATH (as `source .venv/bin/activate` leaves it), and each must exit 0 and
leave the files the README says it leaves. The seconds each took are written to `tour_times.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOUR_HEADING = "## A ten-minute tour on a CPU"

# What each tour command leaves behind (the README's "What each step leaves").
EXPECTED = {
    "make shards": ["out/demo/index.parquet", "out/demo/gaze/select.json"],
    "make report": ["out/demo/shard_stats.html"],
    "make train-demo": ["out/train-demo/stage1", "out/train-demo/stage2"],
    "make animate-demo": ["out/animate-demo/animated.mp4"],
    "python -m train.diagnose": ["out/diagnose-demo/diagnostics.json"],
    "python -m evaluation run": ["out/eval-demo/results.md", "out/eval-demo/metrics.json"],
}


def tour_commands(readme: str) -> list[str]:
    """The tour's shell commands: continuation lines joined, trailing comments dropped."""
    section = readme[readme.index(TOUR_HEADING) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the tour has no ```bash block"
    joined = block.group(1).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(re.sub(r"\s+", " ", command))
    return commands


def test_the_tour_block_is_parsed_into_commands() -> None:
    commands = tour_commands((REPO / "README.md").read_text())
    assert commands[0] == "make shards"
    assert all(not c.startswith("#") and "\\" not in c for c in commands)
    assert any(c.startswith("python -m evaluation run") and "--out out/eval-demo" in c for c in commands)


def copy_repository(dest: Path) -> None:
    """The tracked files as a fresh clone has them, plus this venv (linked, not copied)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(Path(sys.prefix))


@pytest.mark.slow
@pytest.mark.tour
def test_the_readme_tour_runs_as_printed(tmp_path: Path) -> None:
    repo = tmp_path / "megactor-ray"
    copy_repository(repo)
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": sys.prefix}
    env.pop("PYTHONPATH", None)
    times = {}
    for command in tour_commands((repo / "README.md").read_text()):
        start = time.monotonic()
        result = subprocess.run(
            command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=1500
        )
        times[command] = round(time.monotonic() - start, 1)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        for prefix, paths in EXPECTED.items():
            if command.startswith(prefix):
                missing = [p for p in paths if not (repo / p).exists()]
                assert not missing, f"{command}: left no {missing}"
    assert set(EXPECTED) <= {p for p in EXPECTED for c in times if c.startswith(p)}, times
    (tmp_path / "tour_times.json").write_text(json.dumps(times, indent=2))
    print(json.dumps(times, indent=2))
