"""End-to-end shard builds through the real entry points: the CLI, `make shards` and `ray job submit`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from lookalike import REPO, make_celebvhq, make_vfhq_clip
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
    assert set(keys) <= set(manifest["key"])
    assert leftovers(out) == []
    return samples


def test_demo_build_meets_the_contract_and_a_rerun_writes_nothing(tmp_path: Path) -> None:
    """The default demo, as `make shards` builds it."""
    out = tmp_path / "out"
    result = build("--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    samples = assert_contract(out)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(s["__key__"] for s in samples) == sorted(manifest["key"])
    assert len(list((out / "shards").glob("*.tar"))) >= 3
    assert {json.loads(s["json"])["dataset"] for s in samples} == {"demo-vfhq", "demo-celebvhq"}
    assert manifest.groupby(["dataset", "clip_id"])["segment"].max().max() >= 1  # long clips were split
    assert len(pd.read_parquet(out / "failures.parquet")) == 0
    assert "samples written" in result.stderr
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
    again = build("--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    assert "samples written 0, already built" in again.stderr
    assert "Started a local Ray instance" not in again.stderr  # nothing to do: Ray is not even started
    assert time.monotonic() - started < 60


def test_changing_the_recipe_is_refused_unless_overwrite(tmp_path: Path) -> None:
    args = ["--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", str(tmp_path / "out")]
    assert build(*args, *SMALL_DEMO).returncode == 0
    refused = build(*args, *SMALL_DEMO, "seed=1")
    assert refused.returncode == 2 and "another recipe" in refused.stderr and "seed" in refused.stderr
    redone = build(*args, *SMALL_DEMO, "seed=1", "--overwrite")
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "build.json").read_text())["recipe"]["seed"] == 1
    assert_contract(tmp_path / "out")


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


def test_bad_clips_are_recorded_and_the_rest_is_built_with_make_shards(tmp_path: Path) -> None:
    """VFHQ-format folder through `make shards DATASET=vfhq ROOT=... OUT=...`, with a truncated meta
    file and a clip whose frames break mid-way (a decode failure)."""
    root, out = tmp_path / "vfhq", tmp_path / "out"
    good = [make_vfhq_clip(root, f"yt{i}", i, 20, identity=i, as_zip=i == 2) for i in range(3)]
    truncated = make_vfhq_clip(root, "cut", 7, 20)
    meta = root / "meta_info" / f"{truncated}.txt"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])
    broken = make_vfhq_clip(root, "broken", 8, 20)
    (root / "frames" / broken / "00000010.png").write_bytes(b"\x89PNG garbage")

    bin_dir = Path(PYTHON).parent
    # No annotators: this test is about bad input (real datasets default to the full-profile stages).
    overrides = "resolution=64 samples_per_shard=2 min_frames=8 max_failure_fraction=0.5 stages=[]"
    command = [
        "make",
        "-o",
        "setup",
        "shards",
        "DATASET=vfhq",
        f"ROOT={root}",
        f"OUT={out}",
        f"BIN={bin_dir}",
    ]
    result = subprocess.run(
        [*command, f"ARGS={overrides} --no-progress"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    samples = assert_contract(out)
    assert sorted({json.loads(s["json"])["clip_id"] for s in samples}) == sorted(good)
    failures = pd.read_parquet(out / "failures.parquet").set_index("clip_id")
    assert (
        failures.loc[truncated, "stage"] == "source" and failures.loc[truncated, "error"] == "malformed_meta"
    )
    assert (
        failures.loc[broken, "stage"] == "decode"
        and "not a decodable image" in failures.loc[broken, "message"]
    )
    assert failures.loc[broken, "key"] != ""


def test_corrupt_video_is_recorded_and_failure_threshold_sets_the_exit_code(tmp_path: Path) -> None:
    root, out = tmp_path / "celebvhq", tmp_path / "out"
    make_celebvhq(root, {"aa_0": ("aa", 0, 16), "bb_1": ("bb", 1, 16), "cc_2": ("cc", 2, 16)})
    (root / "videos" / "cc_2.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    args = ["--dataset", "celebvhq", "--root", str(root), "--out", str(out), "resolution=64", "min_frames=8"]
    args.append("stages=[]")
    result = build(*args, "max_failure_fraction=0.2")
    assert result.returncode == 1 and "above max_failure_fraction" in result.stderr  # 1 of 3 failed
    samples = assert_contract(out)
    assert sorted(json.loads(s["json"])["clip_id"] for s in samples) == ["aa_0", "bb_1"]
    failures = pd.read_parquet(out / "failures.parquet")
    assert list(failures["clip_id"]) == ["cc_2"] and failures["error"][0] == "unreadable_video"


def test_missing_root_is_one_clear_error(tmp_path: Path) -> None:
    result = build(
        "--dataset", "vfhq", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "stages=[]"
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_ray_job_submit_builds_shards(tmp_path: Path) -> None:
    """`ray job submit --working-dir . -- python jobs/shards.py ...` against a loopback head."""
    with loopback_head(tmp_path / "head", 6391, 8271) as (address, env, _):
        out = tmp_path / "out"
        job = [
            RAY, "job", "submit", "--address", address,
            "--working-dir", ".", "--", "python", "jobs/shards.py", "--dataset", "demo", "--no-progress",
            "--root", str(tmp_path / "demo"), "--out", str(out), *SMALL_DEMO,
        ]  # fmt: skip
        result = subprocess.run(job, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "succeeded" in result.stdout + result.stderr
        assert_contract(out)
