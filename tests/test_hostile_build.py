"""Acceptance test for damaged dataset files: a hostile VFHQ and CelebV-HQ look-alike (tests/hostile_corpus.py)
built through the real CLI, against a clean build of only its good clips.

A build over bad input must end (exit 0 or 1, never a crash), keep every good clip exactly as the clean
build makes it, give every damaged clip one informative failure row naming the clip or the file, write no
black sample, build rotated and variable-frame-rate videos correctly, and stay under 2 GB of memory across
the CLI and every process it starts.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import webdataset as wds
from hostile_corpus import (
    CELEBVHQ_CASES,
    ROTATED_CLIP,
    VFHQ_CASES,
    VFR_CLIP,
    VFR_FRAMES,
    Corpus,
    build_celebvhq,
    build_vfhq,
)
from lookalike import REPO, frames_equal_enough
from process_tree import tree_memory

from pipeline.video import read_video_frames

pytestmark = pytest.mark.slow

# The error code each damaged clip is expected to get. Any informative code is accepted (see
# GENERIC_ERRORS), so a different but specific name still passes; these say what a reader should see.
EXPECTED_ERRORS = {
    "symlink_self": "unreadable_frames",
    "symlink_ancestor": "unreadable_frames",
    "zip_utf8_flag": "unreadable_frames",
    "zip_aes": "encrypted_zip",
    "zip_central_flip": "corrupt_zip",
    "png_bomb_first": "image_too_large",
    "box_centre_outside": "malformed_meta",
    "box_huge": "malformed_meta",
    "fps_nan": "malformed_meta",
    "fps_inf": "malformed_meta",
    "fps_1e308": "malformed_meta",
    "fps_1e-300": "malformed_meta",
    "tiny_8px": "source_too_small",
    "tiny_1px": "source_too_small",
    "png_30000": "image_too_large",
    "zip_big_member": "member_too_large",
    "meta_zip_big_member": "meta_too_large",
    "time_nan": "malformed_meta",
    "time_infinity": "malformed_meta",
    "attributes_list": "malformed_meta",
    "attributes_string": "malformed_meta",
    "attributes_int_value": "malformed_meta",
    "bbox_outside": "malformed_meta",
    "ytb_id_dotdot": "malformed_meta",
}
# Codes that say only that something went wrong: a crashed batch, memory, or a bare exception class.
GENERIC_ERRORS = {
    "", "task_failed", "oom", "out_of_memory", "OutOfMemoryError", "MemoryError", "Exception",
    "RuntimeError", "ValueError", "OSError", "TypeError", "KeyError", "IndexError", "AttributeError",
    "NotImplementedError", "OverflowError", "ZeroDivisionError", "AssertionError", "UnicodeDecodeError",
    "error", "unknown",
}  # fmt: skip
# Memory of the whole process tree (the CLI and every Ray process, polled every 0.2 s). Summed PSS (each
# shared page divided among the processes that map it) is the tree's real footprint and has the absolute
# bound; summed RSS counts a shared page in every process that maps it (torch's and Ray's libraries: a
# clean build of these tiny roots sums ~2.0 GB RSS, ~1.2 GB PSS), so the damaged files are bounded by how
# much RSS they add over the clean build.
PSS_LIMIT = 2 * 10**9
RSS_OVER_CLEAN = 512 << 20
RSS_SAFETY = 8 << 30  # above this the build is killed: the test machine is shared
BUILD_TIMEOUT = 300
OVERRIDES = [
    "resolution=64", "min_frames=8", "max_frames=12", "samples_per_shard=4", "max_failure_fraction=0.9",
    "stages=[]", "num_cpus=2",
]  # fmt: skip
# Mean absolute difference (grey levels) allowed between the hostile and the clean build's decoded
# frames where the bytes differ. VFHQ builds are byte-identical; libx264 as PyAV 18.1 ships it is not:
# the first encode in a process after a decode gives other bytes for the same frames in ~1 of 8 runs
# (measured: up to 1.4 grey levels on a frame), so CelebV-HQ builds of identical files can differ. A frame
# off by one index differs by ~9-13 here. The rotated and variable-frame-rate clips are stored
# differently in the clean root.
GOOD_TOL, JITTER_TOL = 3.0, 4.0
JITTERED = {ROTATED_CLIP, VFR_CLIP}


@dataclass
class Build:
    returncode: int
    stderr: str
    peak_rss: int
    peak_pss: int
    killed: str  # why the monitor killed the build ("" if it did not)
    out: Path

    def samples(self) -> dict[str, dict]:
        """Every sample of the committed shards by key."""
        found: dict[str, dict] = {}
        for tar in sorted((self.out / "shards").glob("*.tar")):
            for sample in wds.WebDataset(str(tar), shardshuffle=False):
                found[sample["__key__"]] = sample
        return found

    def failures(self) -> pd.DataFrame:
        path = self.out / "failures.parquet"
        return (
            pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["clip_id", "error", "message"])
        )

    def describe(self) -> str:
        return f"exit {self.returncode}{', killed: ' + self.killed if self.killed else ''}; stderr tail:\n{self.stderr[-2500:]}"


def kill_all(processes: list[psutil.Process]) -> None:
    for member in processes:
        with contextlib.suppress(psutil.Error):
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def run_build(dataset: str, root: Path, out: Path) -> Build:
    """`python -m pipeline build` on root, RSS of its whole process tree polled every 0.2 s."""
    command = [sys.executable, "-m", "pipeline", "build", "--no-progress", "--dataset", dataset]
    command += ["--root", str(root), "--out", str(out), *OVERRIDES]
    log_path = out.parent / f"{out.name}.stderr"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        handle = psutil.Process(process.pid)
        peak, peak_pss, killed, seen = 0, 0, "", {}
        deadline = time.monotonic() + BUILD_TIMEOUT
        while process.poll() is None:
            rss, pss, members = tree_memory(handle)
            seen.update({m.pid: m for m in members})
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            if rss > RSS_SAFETY or time.monotonic() > deadline:
                killed = f"RSS {rss / 2**30:.1f} GiB" if rss > RSS_SAFETY else f"over {BUILD_TIMEOUT} s"
                kill_all(members)
                break
            time.sleep(0.2)
        returncode = process.wait(timeout=60)
    # Ray processes the CLI started and left behind (a crash skips its shutdown): ours, ended by pid.
    kill_all([p for p in seen.values() if p.pid != process.pid and p.is_running()])
    return Build(returncode, log_path.read_text(errors="replace"), peak, peak_pss, killed, out)


@dataclass
class Pair:
    corpus: Corpus
    hostile: Build
    clean: Build


def _pair(tmp_path_factory, dataset: str, builder) -> Pair:
    base = tmp_path_factory.mktemp(dataset)
    corpus = builder(base / "hostile")
    builder(base / "clean", hostile=False)
    return Pair(
        corpus,
        run_build(dataset, base / "hostile", base / "out-hostile"),
        run_build(dataset, base / "clean", base / "out-clean"),
    )


@pytest.fixture(scope="module")
def vfhq(tmp_path_factory) -> Pair:
    return _pair(tmp_path_factory, "vfhq", build_vfhq)


@pytest.fixture(scope="module")
def celebvhq(tmp_path_factory) -> Pair:
    return _pair(tmp_path_factory, "celebvhq", build_celebvhq)


@pytest.fixture(params=["vfhq", "celebvhq"])
def pair(request) -> Pair:
    return request.getfixturevalue(request.param)


def clip_samples(samples: dict[str, dict], clip_id: str) -> dict[str, dict]:
    return {k: s for k, s in samples.items() if json.loads(s["json"])["clip_id"] == clip_id}


def test_the_build_ends_without_a_crash(pair: Pair) -> None:
    build = pair.hostile
    assert not build.killed and build.returncode in (0, 1), build.describe()
    assert "Traceback" not in build.stderr, build.describe()


def test_the_clean_build_holds_every_good_clip(pair: Pair) -> None:
    clean = pair.clean
    assert clean.returncode == 0 and "Traceback" not in clean.stderr, clean.describe()
    samples = clean.samples()
    for clip_id in pair.corpus.good:
        assert clip_samples(samples, clip_id), f"{clip_id}: no sample in the clean build"


def test_good_clips_are_built_as_in_the_clean_build(pair: Pair) -> None:
    """Same keys, same real.mp4 bytes or decoded frames within GOOD_TOL (JITTER_TOL for the rotated and
    variable-frame-rate clips, stored differently in the clean root)."""
    hostile, clean = pair.hostile.samples(), pair.clean.samples()
    for clip_id in pair.corpus.good:
        got, want = clip_samples(hostile, clip_id), clip_samples(clean, clip_id)
        assert sorted(got) == sorted(want), f"{clip_id}: keys differ\n{pair.hostile.describe()}"
        for key in want:
            a, b = read_video_frames(got[key]["real.mp4"]), read_video_frames(want[key]["real.mp4"])
            if got[key]["real.mp4"] != want[key]["real.mp4"]:
                tol = JITTER_TOL if clip_id in JITTERED else GOOD_TOL
                assert frames_equal_enough(a, b, tol=tol), f"{key}: frames differ from the clean build"


@pytest.mark.parametrize(
    ("dataset", "case"),
    [("vfhq", c) for c in VFHQ_CASES] + [("celebvhq", c) for c in CELEBVHQ_CASES],
)
def test_every_damaged_clip_has_an_informative_failure_row(request, dataset: str, case: str) -> None:
    pair: Pair = request.getfixturevalue(dataset)
    bad = pair.corpus.bad[case]
    failures = pair.hostile.failures()
    rows = failures[failures["clip_id"] == bad.clip_id]
    if rows.empty:  # a reader that renames an unsafe clip id still has to say which one it was
        rows = failures[failures["message"].str.contains(bad.clip_id, regex=False)]
    assert not rows.empty, (
        f"{case}: no failure row for {bad.clip_id}; expected error "
        f"{EXPECTED_ERRORS[case]!r}\n{pair.hostile.describe()}"
    )
    for row in rows.itertuples():
        assert row.error not in GENERIC_ERRORS, (
            f"{case}: error {row.error!r} says nothing about the cause (expected e.g. {EXPECTED_ERRORS[case]!r}): "
            f"{row.message}"
        )
        named = [bad.clip_id, *bad.files]
        assert any(name in row.message for name in named), (
            f"{case}: message names none of {named}: {row.message}"
        )
    built = clip_samples(pair.hostile.samples(), bad.clip_id)
    assert not built, f"{case}: {bad.clip_id} was also built: {sorted(built)}"


def test_no_sample_is_all_black(pair: Pair) -> None:
    samples = pair.hostile.samples()
    assert samples, pair.hostile.describe()
    black = [k for k, s in samples.items() if read_video_frames(s["real.mp4"]).max() <= 16]
    assert not black, f"all-black samples: {black}"


def test_rotated_and_variable_frame_rate_videos_build_correctly(celebvhq: Pair) -> None:
    """The phone video shows its face region upright (equal to the same content stored unrotated), and
    the variable-frame-rate video builds with every one of its frames."""
    hostile = celebvhq.hostile.samples()
    rotated = clip_samples(hostile, ROTATED_CLIP)
    assert rotated, f"{ROTATED_CLIP} was not built\n{celebvhq.hostile.describe()}"
    clean = celebvhq.clean.samples()
    for key, sample in rotated.items():
        frames = read_video_frames(sample["real.mp4"])
        assert frames_equal_enough(frames, read_video_frames(clean[key]["real.mp4"]), tol=JITTER_TOL), key
    vfr = clip_samples(hostile, VFR_CLIP)
    assert vfr, f"{VFR_CLIP} was not built\n{celebvhq.hostile.describe()}"
    spans = [json.loads(s["json"]) for s in vfr.values()]
    first, stop = min(m["frame_start"] for m in spans), max(m["frame_stop"] for m in spans)
    assert stop - first == VFR_FRAMES, f"{VFR_CLIP}: frames {first}..{stop}, the video holds {VFR_FRAMES}"


def test_peak_memory_of_the_whole_process_tree(pair: Pair) -> None:
    hostile, clean = pair.hostile, pair.clean
    assert hostile.peak_rss and clean.peak_rss and hostile.peak_pss, "no memory measured"
    print(
        f"peak memory: hostile RSS {hostile.peak_rss / 1e9:.2f} GB PSS {hostile.peak_pss / 1e9:.2f} GB; "
        f"clean RSS {clean.peak_rss / 1e9:.2f} GB PSS {clean.peak_pss / 1e9:.2f} GB"
    )
    assert hostile.peak_pss < PSS_LIMIT, (
        f"peak PSS of the process tree {hostile.peak_pss / 1e9:.2f} GB (clean build "
        f"{clean.peak_pss / 1e9:.2f} GB), over {PSS_LIMIT / 1e9:.0f} GB; {hostile.describe()}"
    )
    assert hostile.peak_rss < clean.peak_rss + RSS_OVER_CLEAN, (
        f"peak RSS {hostile.peak_rss / 2**30:.2f} GiB, clean build {clean.peak_rss / 2**30:.2f} GiB, "
        f"allowed {RSS_OVER_CLEAN >> 20} MiB more; {hostile.describe()}"
    )
