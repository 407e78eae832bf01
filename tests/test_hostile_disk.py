"""A hostile disk under the build and `select`: a full filesystem, a kill at any instant of the subset
switch, and the exit codes that tell these apart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from lookalike import REPO
from test_build_e2e import SMALL_DEMO, assert_contract, build
from test_select import fake_shard_set

from pipeline.__main__ import EXIT_CRASH, EXIT_DISK_FULL, EXIT_USAGE, main
from pipeline.select import run_select

PYTHON = sys.executable
MiB = 2**20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs (needs root to mount), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on `disk`."""
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(ballast, "wb") as handle:
        handle.write(b"\0" * (free - leave))
    return ballast


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line or " CRITICAL " in line]


@pytest.mark.slow
def test_a_full_disk_is_a_write_failure_one_clear_line_and_a_rerun_finishes(
    tmp_path: Path, small_disk: Path
) -> None:
    out = small_disk / "out"
    args = ["--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(out), *SMALL_DEMO]
    # Room for the manifest and build.json, not for the ~0.5 MiB of shards.
    ballast = fill(small_disk, leave=96 * 1024)
    full = build(*args)
    assert full.returncode == EXIT_DISK_FULL, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    (line,) = [line for line in error_lines(full.stderr) if "disk full" in line]
    assert str(out / "shards") in line and "free on that filesystem" in line
    assert "Free space there" in line and "rerun the same command" in line
    assert "listed in failures.parquet" in line
    failures = pd.read_parquet(out / "failures.parquet")
    assert len(failures) > 0
    assert set(failures["stage"]) == {"write"} and set(failures["error"]) == {"ENOSPC"}
    assert all(str(out / "shards") in message for message in failures["message"])
    assert all("No space left on device" in message for message in failures["message"])

    ballast.unlink()  # the user frees space and reruns the same command
    rerun = build(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    samples = assert_contract(out)
    manifest_keys = sorted(pd.read_parquet(out / "manifest.parquet")["key"])
    assert sorted(s["__key__"] for s in samples) == manifest_keys  # each exactly once
    assert len(pd.read_parquet(out / "failures.parquet")) == 0


def test_when_even_failures_parquet_does_not_fit_the_line_says_so(small_disk: Path) -> None:
    from pipeline.build import DiskFull, _finish_outputs

    out = small_disk / "out"
    (out / "shards").mkdir(parents=True)
    fill(small_disk, leave=0)
    failure = {"clip_id": "c", "dataset": "demo", "key": "k", "stage": "write", "error": "ENOSPC"}
    with pytest.raises(DiskFull) as info:
        _finish_outputs(str(out), str(out / "shards"), [{**failure, "message": "could not write x"}])
    assert "failures.parquet could not be written either" in str(info.value)
    assert "1 samples not written" in str(info.value) and not (out / "failures.parquet").exists()
    assert list((out / "shards").iterdir()) == [] and [p.name for p in out.iterdir()] == ["shards"]


def test_a_damaged_build_json_is_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.json").write_text('{"recipe": ')  # truncated JSON
    result = build("--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(out), "stages=[]")
    assert result.returncode == EXIT_USAGE, result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    assert f"{out / 'build.json'} is not valid JSON" in line and "--overwrite" in line


def test_a_damaged_stats_marker_names_the_file_and_the_fix(tmp_path: Path) -> None:
    fake_shard_set(tmp_path, [1.0, 2.0])
    (marker,) = (tmp_path / "shards").glob("*.stats.json")
    marker.write_bytes(b"\x89PNG\r\n\x1a\n")  # not JSON (nor UTF-8)
    assert main(["select", "--out", str(tmp_path), "--min-frames", "1"]) == EXIT_USAGE
    result = subprocess.run(
        [PYTHON, "-m", "pipeline", "select", "--out", str(tmp_path), "--min-frames", "1"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    (line,) = error_lines(result.stderr)
    assert f"{marker} is not valid JSON" in line and "rerun the build" in line


def test_a_crash_has_its_own_exit_code_and_one_line_after_the_traceback(tmp_path: Path) -> None:
    # A valid Parquet index whose num_frames are text: comparing them with a number is an error no
    # check expects.
    fake_shard_set(tmp_path, [1.0, 2.0])
    index = pd.read_parquet(tmp_path / "index.parquet")
    index.assign(num_frames=["10", "11"]).to_parquet(tmp_path / "index.parquet")
    result = subprocess.run(
        [PYTHON, "-m", "pipeline", "select", "--out", str(tmp_path), "--min-frames", "1"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == EXIT_CRASH, result.stderr[-2000:]
    assert "Traceback" in result.stderr
    last = error_lines(result.stderr)[-1]
    assert "unexpected error (exit 3): TypeError" in last and ".py:" in last


def test_help_documents_the_exit_codes() -> None:
    result = subprocess.run([PYTHON, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True)
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130"):
        assert f"\n  {code}" in result.stdout


# The subset switch, SIGKILLed before each filesystem step on an entry of OUT or OUT/gaze.versions. The child
# runs the real run_select; the hook only decides when the process dies.
KILL_AT_STEP = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path

    out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    steps = 0

    def hooked(fn):
        def run(*args, **kwargs):
            global steps
            paths = [Path(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
            if any(p.parent in (out, out / "gaze.versions") for p in paths):
                steps += 1
                if steps == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return run

    os.replace, os.rename, os.symlink = hooked(os.replace), hooked(os.rename), hooked(os.symlink)
    shutil.rmtree = hooked(shutil.rmtree)
    from pipeline.select import run_select
    run_select(out, threshold=300.0, score="authors", min_frames=1)
    """
)


def reader_view(out: Path) -> list[str]:
    """What a reader of OUT/gaze sees: the selected keys, checked against the shards and index there."""
    gaze = out / "gaze"
    selection = json.loads((gaze / "select.json").read_text())
    index = pd.read_parquet(gaze / "index.parquet")
    stats = [json.loads(p.read_text()) for p in (gaze / "shards").glob("*.stats.json")]
    tars = sorted(p.name for p in (gaze / "shards").glob("*.tar"))
    assert tars == sorted(s["shard"] for s in stats)
    assert sorted(index["key"]) == sorted(k for s in stats for k in s["keys"]) == selection["keys"]
    return selection["keys"]


def leftovers(out: Path) -> list[str]:
    """Everything of the subset besides OUT/gaze and the one version it links to."""
    found = [p.name for p in out.iterdir() if p.name.startswith(".gaze")]
    versions = out / "gaze.versions"
    if versions.is_dir():
        current = (out / "gaze").resolve()
        found += [p.name for p in versions.iterdir() if p.name != ".lock" and p.resolve() != current]
    return found


def test_select_killed_at_any_step_leaves_a_complete_subset_and_a_rerun_cleans_up(tmp_path: Path) -> None:
    base = tmp_path / "base"
    fake_shard_set(base, [float(i) for i in range(40)])
    old = run_select(base, min_frames=1)[0].keys  # the top 5 %: 2 samples
    probe = tmp_path / "probe"
    subprocess.run(["cp", "-a", str(base), str(probe)], check=True)
    new = run_select(probe, threshold=300.0, score="authors", min_frames=1)[0].keys  # 9 samples
    assert len(old) == 2 and len(new) == 9
    for step in range(1, 20):
        out = tmp_path / f"kill-{step}"
        subprocess.run(["cp", "-a", str(base), str(out)], check=True)
        done = subprocess.run(
            [PYTHON, "-c", KILL_AT_STEP, str(out), str(step)], cwd=REPO, capture_output=True
        )
        if done.returncode == 0:  # no step left to kill at: the switch ran to its end
            assert reader_view(out) == new and leftovers(out) == []
            break
        assert done.returncode == -9, done.stderr.decode()[-2000:]
        assert reader_view(out) in (old, new), f"killed at step {step}: no complete subset"
        # The next select (here the same rule again) cleans what the killed one left.
        run_select(out, threshold=300.0, score="authors", min_frames=1)
        assert reader_view(out) == new and leftovers(out) == [], f"killed at step {step}"
    assert step >= 4, "the switch has at least three steps to kill at"


def test_a_subset_in_the_earlier_real_folder_layout_is_replaced_by_the_link(tmp_path: Path) -> None:
    fake_shard_set(tmp_path, [float(i) for i in range(40)])
    old = run_select(tmp_path, min_frames=1)[0].keys
    # The layout before versions: OUT/gaze a real folder.
    real = tmp_path / "gaze"
    shutil.copytree(real.resolve(), tmp_path / "copied")
    real.unlink()
    shutil.rmtree(tmp_path / "gaze.versions")
    (tmp_path / "copied").rename(real)
    assert reader_view(tmp_path) == old and not real.is_symlink()
    new = run_select(tmp_path, threshold=300.0, score="authors", min_frames=1)[0].keys
    assert (tmp_path / "gaze").is_symlink() and reader_view(tmp_path) == new and leftovers(tmp_path) == []
