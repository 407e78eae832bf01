"""End-to-end shard builds through the real entry points: the CLI, `make shards` and `ray job submit`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from demo_build import DemoBuild
from lookalike import (
    REPO,
    STANDARD_BBOX,
    info_entry,
    make_celebvhq,
    make_raw_video,
    make_vfhq_clip,
    write_info,
)
from ray_helpers import RAY, kill_tree, loopback_head

from pipeline import contract
from pipeline.config import load_build_config
from pipeline.stages import get_stage
from pipeline.video import read_video_frames

pytestmark = pytest.mark.slow

PYTHON = sys.executable
# A small demo without annotators, for the tests about writing, resuming and submitting: the
# annotators are covered by the default-demo test and their own tests.
SMALL_DEMO = [
    "demo.identities=3", "demo.vfhq_clips=3", "demo.celebvhq_clips=3", "demo.min_frames=20",
    "demo.max_frames=40", "max_frames=24", "min_frames=8", "resolution=128", "samples_per_shard=2",
    "stages=[]",
]  # fmt: skip


def build(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", "pipeline", "build", "--no-progress", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def tar_samples(out: Path) -> list[dict]:
    samples = []
    for tar in sorted((out / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            samples.append(dict(sample, shard=tar.stem))
    return samples


def leftovers(out: Path) -> list[str]:
    """Temp files, and shard files whose commit marker is missing."""
    shards = out / "shards"
    committed = {p.name.split(".")[0] for p in shards.glob("*.stats.json")}
    return sorted(
        p.name for p in shards.iterdir() if p.name.startswith(".") or p.name.split(".")[0] not in committed
    )


def assert_contract(out: Path) -> list[dict]:
    """Every sample decodes and agrees with its json, the stats and the index."""
    samples = tar_samples(out)
    index = pd.read_parquet(out / "index.parquet")
    manifest = pd.read_parquet(out / "manifest.parquet")
    stats = [json.loads(p.read_text()) for p in (out / "shards").glob("*.stats.json")]
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)), "a sample is in two shards"
    assert sorted(keys) == sorted(index["key"]) == sorted(k for s in stats for k in s["keys"])
    assert sum(s["samples"] for s in stats) == len(samples)
    by_key = index.set_index("key")
    split_of_shard = {st["shard"][: -len(".tar")]: st["split"] for st in stats}
    for sample in samples:
        meta = contract.SampleMeta.from_json_bytes(sample["json"])
        assert contract.required_members(meta) <= set(sample), meta.key
        frames = read_video_frames(sample["real.mp4"])
        assert frames.shape == (meta.num_frames, meta.resolution, meta.resolution, 3)
        assert meta.num_frames == meta.frame_stop - meta.frame_start
        row = by_key.loc[meta.key]
        assert (row["shard"], row["num_frames"], row["bucket"]) == (
            sample["shard"],
            meta.num_frames,
            meta.bucket,
        )
        assert row["size_real_mp4"] == len(sample["real.mp4"])
        assert row["split"] == meta.split == split_of_shard[sample["shard"]]  # shards are split-pure
    assert set(keys) <= set(manifest["key"])
    assert (index.groupby(["dataset", "identity"])["split"].nunique() == 1).all()  # no identity in two
    assert leftovers(out) == []
    return samples


def test_demo_build_meets_the_contract_and_a_rerun_writes_nothing(default_demo_build: DemoBuild) -> None:
    """The default demo, as `make shards` builds it (the session's shared build, see tests/conftest.py)."""
    root, out, result = default_demo_build
    samples = assert_contract(out)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(s["__key__"] for s in samples) == sorted(manifest["key"])
    assert len(list((out / "shards").glob("*.tar"))) >= 3
    assert {json.loads(s["json"])["dataset"] for s in samples} == {"demo-vfhq", "demo-celebvhq"}
    assert manifest.groupby(["dataset", "clip_id"])["segment"].max().max() >= 1  # long clips were split
    assert len(pd.read_parquet(out / "failures.parquet")) == 0
    assert "samples written" in result.stderr
    # A log a person reads (nohup, Slurm): our lines, no Ray progress blocks, memory or C++ warnings.
    log = (result.stdout + result.stderr).splitlines()
    assert len(log) < 60, "\n".join(log)
    assert not [line for line in log if "RayDeprecationWarning" in line or "logging_progress" in line], log
    # Every annotator of the demo ran on every sample of its bucket, and only there.
    stages = {s.name: get_stage(s.name).buckets for s in load_build_config("demo").stages}
    assert {"face_mask", "foreground", "gaze", "swap", "stylise"} <= set(stages)
    for sample in samples:
        meta = contract.SampleMeta.from_json_bytes(sample["json"])
        expected = {name for name, buckets in stages.items() if buckets is None or meta.bucket in buckets}
        assert set(meta.annotations) == expected, meta.key
        assert {contract.FACE_MASK, contract.FG_MASK, contract.GAZE} <= set(sample)
        assert (contract.SWAP in sample) == (meta.bucket == "swap")
        assert (contract.STYLE in sample) == (meta.bucket == "style")
        frames = meta.num_frames
        assert contract.decode_mask(sample[contract.FACE_MASK]).shape == (
            frames,
            meta.resolution,
            meta.resolution,
        )
        assert contract.decode_gaze(sample[contract.GAZE]).shape == (frames, 2)
        assert meta.fg_backend in ("parsing", "densepose") and meta.gaze_scores
    assert {json.loads(s["json"])["bucket"] for s in samples} == {"real", "swap", "style"}

    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    started = time.monotonic()
    again = build("--dataset", "demo", "--root", str(root), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    assert "samples written 0, already built" in again.stderr
    assert "Started a local Ray instance" not in again.stderr  # nothing to do: Ray is not even started
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def small_demo_by_job(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    """SMALL_DEMO built by `ray job submit --working-dir . -- python jobs/shards.py ...` against a
    loopback head (`result`: the job command's); the recipe test starts from a copy of it."""
    base = tmp_path_factory.mktemp("job")
    root, out = base / "demo", base / "out"
    with loopback_head(base / "head", 6391, 8271) as (address, env, _):
        job = [
            RAY, "job", "submit", "--address", address,
            "--working-dir", ".", "--", "python", "jobs/shards.py", "--dataset", "demo", "--no-progress",
            "--root", str(root), "--out", str(out), *SMALL_DEMO,
        ]  # fmt: skip
        result = subprocess.run(job, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    return DemoBuild(root, out, result)


def test_changing_the_recipe_is_refused_unless_overwrite(
    small_demo_by_job: DemoBuild, tmp_path: Path
) -> None:
    assert small_demo_by_job.result.returncode == 0, (
        "the job's build failed: see test_ray_job_submit_builds_shards"
    )
    out = tmp_path / "out"
    shutil.copytree(small_demo_by_job.out, out)  # a finished SMALL_DEMO build (seed 0), ours to change
    args = ["--dataset", "demo", "--root", str(small_demo_by_job.root), "--out", str(out)]
    refused = build(*args, *SMALL_DEMO, "seed=1")
    assert refused.returncode == 2 and "another recipe" in refused.stderr and "seed" in refused.stderr
    redone = build(*args, *SMALL_DEMO, "seed=1", "--overwrite")
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert json.loads((out / "build.json").read_text())["recipe"]["seed"] == 1
    assert_contract(out)


def test_a_killed_build_resumes_without_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(out)]
    # One sample per shard and one CPU: many small commits, so the kill lands mid-run.
    slow = [*SMALL_DEMO, "samples_per_shard=1", "num_cpus=1"]
    command = [PYTHON, "-m", "pipeline", "build", "--no-progress", *args, *slow]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((out / "shards").glob("*.stats.json")):
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.2)
    kill_tree(process)  # the whole job at once, as a scheduler does
    manifest_keys = set(pd.read_parquet(out / "manifest.parquet")["key"])
    committed = {k for p in (out / "shards").glob("*.stats.json") for k in json.loads(p.read_text())["keys"]}
    assert 0 < len(committed) < len(manifest_keys), "the kill should land part-way"

    resumed = build(*args, *slow)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    samples = assert_contract(out)
    assert sorted(s["__key__"] for s in samples) == sorted(manifest_keys)  # each exactly once
    assert f"already built {len(committed)}" in resumed.stderr


def make_shards(dataset: str, root: Path, out: Path, overrides: str) -> subprocess.CompletedProcess:
    """`make shards DATASET=... ROOT=... OUT=...` with this venv (no setup step)."""
    command = ["make", "-o", "setup", "shards", f"DATASET={dataset}", f"ROOT={root}", f"OUT={out}"]
    command += [f"BIN={Path(PYTHON).parent}", f"ARGS={overrides} --no-progress"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def clip_frames(index: pd.DataFrame) -> dict[str, int]:
    """Frames of each clip the shards cover (segments are full windows, the last overlapping)."""
    spans = index.groupby("clip_id").agg(first=("frame_start", "min"), stop=("frame_stop", "max"))
    return {str(clip): int(row.stop - row.first) for clip, row in spans.iterrows()}


def test_make_shards_on_the_official_vfhq_layout(tmp_path: Path) -> None:
    """VFHQ as its extraction script leaves it (meta_info/VFHQ-Train|Test, <ytid>/<clip>/00000001.png,
    cropped; a multi-clip zip; both row conventions), plus a truncated meta file and a clip whose frames
    break mid-way (a decode failure): `make shards DATASET=vfhq ROOT=...` with nothing else."""
    root, out = tmp_path / "vfhq", tmp_path / "out"
    good = {
        make_vfhq_clip(root, "_-a1_b", 0, 20, identity=0): 20,
        make_vfhq_clip(root, "yt-2", 1, 17, identity=1, rows_from_start=False): 17,
        make_vfhq_clip(root, "z_3", 2, 18, identity=2, layout="group:1"): 18,
        make_vfhq_clip(root, "held-out", 3, 16, identity=3, split_folder="VFHQ-Test"): 16,
    }
    truncated = make_vfhq_clip(root, "cut", 7, 20)
    meta = root / "meta_info" / "VFHQ-Train" / f"{truncated}.txt"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])
    broken = make_vfhq_clip(root, "broken", 8, 20)
    (root / "extracted_cropped_face_results" / "broken" / broken / "00000003.png").write_bytes(
        b"\x89PNG garbage"
    )
    # No annotators: this test is about reading the dataset (real datasets default to the full-profile stages).
    overrides = (
        "resolution=64 samples_per_shard=2 min_frames=8 max_frames=12 max_failure_fraction=0.5 stages=[]"
    )
    result = make_shards("vfhq", root, out, overrides)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert_contract(out)
    index = pd.read_parquet(out / "index.parquet")
    built = clip_frames(index)
    assert built.pop(broken, 0) < 20  # the broken frame's segment failed; the clip's other one is kept
    assert built == good  # every good clip whole: end - start - 1 frames
    splits = dict(zip(index["clip_id"], index["split"], strict=True))
    assert splits[next(n for n in good if "held-out" in n)] == "test"
    assert {splits[n] for n in good if "held-out" not in n} <= {"train", "val"}
    failures = pd.read_parquet(out / "failures.parquet").set_index("clip_id")
    assert (failures.loc[truncated, "stage"], failures.loc[truncated, "error"]) == (
        "source",
        "malformed_meta",
    )
    assert (
        failures.loc[broken, "stage"] == "decode"
        and "not a decodable image" in failures.loc[broken, "message"]
    )
    assert failures.loc[broken, "key"] != ""


def test_make_shards_on_a_raw_celebvhq_download(tmp_path: Path) -> None:
    """The official download_and_process.py's default output: celebvhq_info.json and raw/<ytb_id>.mp4,
    two clips per source video; one entry with a negative end_sec, one whose video never downloaded."""
    root, out = tmp_path / "celebvhq", tmp_path / "out"
    for n, ytb_id in enumerate(["a_b-1", "-c_2"]):
        make_raw_video(root, ytb_id, 90, identity=n)
    entries = {
        "a_b-1_0": info_entry("a_b-1", 0.2, 1.2, STANDARD_BBOX, emotion="happy"),
        "a_b-1_1": info_entry("a_b-1", 2.0, 3.4, STANDARD_BBOX, emotion="sadness"),
        "-c_2_0": info_entry("-c_2", 0.0, 0.96, STANDARD_BBOX, emotion="neutral"),
        "-c_2_1": info_entry("-c_2", 1.5, -1.0, STANDARD_BBOX),
        "gone_0": info_entry("gone", 0.0, 1.0, STANDARD_BBOX),
    }
    write_info(root, entries)
    overrides = (
        "resolution=64 samples_per_shard=2 min_frames=8 max_frames=16 max_failure_fraction=0.5 stages=[]"
    )
    result = make_shards("celebvhq", root, out, overrides)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert_contract(out)
    index = pd.read_parquet(out / "index.parquet")
    assert clip_frames(index) == {"a_b-1_0": 25, "a_b-1_1": 35, "-c_2_0": 24}  # (end - start) x 25 fps
    assert set(index.loc[index["clip_id"] == "a_b-1_1", "emotion"]) == {"sadness"}
    assert index.groupby("identity")["split"].nunique().max() == 1
    failures = pd.read_parquet(out / "failures.parquet").set_index("clip_id")
    assert (
        failures.loc["-c_2_1", "error"] == "malformed_meta"
        and failures.loc["gone_0", "error"] == "missing_video"
    )


def test_corrupt_video_is_recorded_and_failure_threshold_sets_the_exit_code(tmp_path: Path) -> None:
    root, out = tmp_path / "celebvhq", tmp_path / "out"
    make_celebvhq(root, {"aa_0": ("aa", 0, 16), "bb_1": ("bb", 1, 16), "cc_2": ("cc", 2, 16)})
    (root / "processed" / "cc_2.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    args = ["--dataset", "celebvhq", "--root", str(root), "--out", str(out), "resolution=64", "min_frames=8"]
    args.append("stages=[]")
    result = build(*args, "max_failure_fraction=0.2")
    assert result.returncode == 1 and "above max_failure_fraction" in result.stderr  # 1 of 3 failed
    samples = assert_contract(out)
    assert sorted(json.loads(s["json"])["clip_id"] for s in samples) == ["aa_0", "bb_1"]
    failures = pd.read_parquet(out / "failures.parquet")
    assert list(failures["clip_id"]) == ["cc_2"] and failures["error"][0] == "unreadable_video"


def test_a_build_that_finds_no_usable_clip_fails_and_says_why(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = build("--dataset", "vfhq", "--root", str(empty), "--out", str(tmp_path / "out1"), "stages=[]")
    assert result.returncode == 2 and "no VFHQ meta files" in result.stderr and str(empty) in result.stderr
    root = tmp_path / "celebvhq"  # every clip fails at the source: non-zero, failures recorded
    write_info(
        root,
        {"x_0": info_entry("x", 0.0, 1.0, STANDARD_BBOX), "y_0": info_entry("y", 0.0, 1.0, STANDARD_BBOX)},
    )
    (root / "raw").mkdir()
    result = build("--dataset", "celebvhq", "--root", str(root), "--out", str(tmp_path / "out2"), "stages=[]")
    assert result.returncode == 2 and "all 2 clips failed at the source (missing_video 2" in result.stderr
    assert len(pd.read_parquet(tmp_path / "out2" / "failures.parquet")) == 2


def test_missing_root_is_one_clear_error(tmp_path: Path) -> None:
    result = build(
        "--dataset", "vfhq", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "stages=[]"
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_ray_job_submit_builds_shards(small_demo_by_job: DemoBuild) -> None:
    """`ray job submit --working-dir . -- python jobs/shards.py ...` against a loopback head."""
    result = small_demo_by_job.result
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert_contract(small_demo_by_job.out)
