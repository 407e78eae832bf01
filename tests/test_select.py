"""The gaze subset: which samples, copied byte for byte into their own shard set, idempotently."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lookalike import REPO

from pipeline import contract
from pipeline.select import run_select, select_keys, stage2_span
from pipeline.writer import merge_index, write_shard

# The small demo of tests/test_build_e2e.py at 64 px, with only the gaze annotator so real scores exist.
SMALL_GAZE_DEMO = [
    "demo.identities=3", "demo.vfhq_clips=3", "demo.celebvhq_clips=3", "demo.min_frames=20",
    "demo.max_frames=40", "max_frames=24", "min_frames=8", "resolution=64", "samples_per_shard=2",
    "task_num_cpus=0.5", "stages=[{name: gaze, num_cpus: 0.2, options: {input_size: 64, frame_batch: 8}}]",
]  # fmt: skip


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@functools.cache
def _small_gaze_build(base: Path) -> Path:
    out = base / "small-gaze-build" / "out"
    done = cli(
        "build", "--no-progress", "--root", str(out.parent / "data"), "--out", str(out), *SMALL_GAZE_DEMO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def small_gaze_build(tmp_path_factory: pytest.TempPathFactory, dest: Path) -> Path:
    """A copy (in dest) of the session's one small demo build with gaze scores (built on first use)."""
    out = _small_gaze_build(tmp_path_factory.getbasetemp())
    shutil.copytree(out, dest)
    return dest


def fake_shard_set(
    out: Path,
    scores: list[float],
    per_shard: int = 2,
    splits: list[str] | None = None,
    frames: list[int] | None = None,
) -> pd.DataFrame:
    """A shard set with made-up member bytes (no video): enough for selection and copying. Samples are
    train with 10 + i frames unless `splits` / `frames` say otherwise (a shard holds one split)."""
    shards = out / "shards"
    shards.mkdir(parents=True)
    (out / "build.json").write_text(json.dumps({"config": {"samples_per_shard": per_shard}}))
    rows = []
    for i, score in enumerate(scores):
        split = splits[i] if splits else "train"
        length = frames[i] if frames else 10 + i
        meta = contract.SampleMeta(
            key=f"demo__c{i:02d}__s000", clip_id=f"c{i:02d}", dataset="demo", identity="x", source="s",
            fps=25.0, num_frames=length, segment=0, frame_start=0, frame_stop=length, crop_box=[0, 0, 1, 1],
            resolution=8, bucket="real", split=split,
            gaze_scores={"robust_spread_deg": score, "authors": 10 * score},
        )  # fmt: skip
        members = {m: b"" for m in contract.ALL_MEMBERS}
        members.update({contract.REAL: f"video {i}".encode(), contract.META: meta.to_json_bytes()})
        row = {"key": meta.key, "clip_id": meta.clip_id, "dataset": "demo", "bucket": "real", "split": split}
        rows.append({**row, "num_frames": meta.num_frames, "timings": "{}", **members})
        rows[-1].update(error_stage="", error="", message="")
    for split in sorted({row["split"] for row in rows}):
        group = [row for row in rows if row["split"] == split]
        for start in range(0, len(group), per_shard):
            write_shard(group[start : start + per_shard], shards)
    return merge_index(out, shards)


def members_of(shards_dir: Path) -> dict[str, bytes]:
    found = {}
    for tar_path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            found.update({info.name: tar.extractfile(info).read() for info in tar if info.isfile()})
    return found


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_select_keys_top_fraction_threshold_and_nan() -> None:
    index = pd.DataFrame({"key": list("abcdef"), "s": [1.0, np.nan, 5.0, 3.0, 5.0, 2.0]})
    assert select_keys(index, "s", top=0.05) == (["c", "e"], 5.0)  # one wanted, the tie at the cut kept
    assert select_keys(index, "s", top=0.6) == (["c", "d", "e"], 3.0)  # 60 % of the 5 scored
    assert select_keys(index, "s", threshold=2.0) == (["c", "d", "e"], 2.0)
    assert select_keys(index, "missing")[0] == []
    assert select_keys(index.assign(s=np.nan), "s")[0] == []


def test_subset_copies_members_and_reruns_write_nothing(tmp_path: Path) -> None:
    index = fake_shard_set(tmp_path, [float(i) for i in range(40)])
    selection, written = run_select(tmp_path, min_frames=1)
    assert written and selection.selected == 2 and selection.threshold == 38.0
    gaze = tmp_path / "gaze"
    sub = pd.read_parquet(gaze / "index.parquet")
    assert list(sub["key"]) == ["demo__c38__s000", "demo__c39__s000"]
    main = members_of(tmp_path / "shards")
    assert members_of(gaze / "shards") == {
        k: v for k, v in main.items() if k.split(".")[0] in set(sub["key"])
    }
    saved = json.loads((gaze / "select.json").read_text())
    assert (saved["selected"], saved["column"], saved["shards"]) == (2, "gaze_robust_spread_deg", 1)
    before = snapshot(tmp_path)
    assert run_select(tmp_path, min_frames=1)[1] is False and snapshot(tmp_path) == before

    selection, written = run_select(tmp_path, threshold=300.0, score="authors", min_frames=1)
    assert written and selection.selected == 9  # authors = 10 x score: 310..390
    assert sorted(pd.read_parquet(gaze / "index.parquet")["key"]) == sorted(
        index.loc[index["gaze_authors"] > 300, "key"]
    )
    assert len(list((gaze / "shards").glob("*.stats.json"))) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old subset left


def test_subset_ranks_only_train_samples_long_enough_for_stage_2(tmp_path: Path) -> None:
    # The best scores sit in val / test and in a segment shorter than stage 2's span: none may be picked.
    scores = [float(i) for i in range(20)]
    splits = ["train"] * 16 + ["val", "val", "test", "train"]
    frames = [200] * 19 + [100]
    fake_shard_set(tmp_path, scores, splits=splits, frames=frames)
    selection, _ = run_select(tmp_path, top=0.2)  # min_frames: configs/train/stage2.yaml's span
    assert selection.min_frames == (16 - 1) * 12 + 1
    assert selection.keys == [f"demo__c{i:02d}__s000" for i in (12, 13, 14, 15)]  # 20 % of 16, rounded up
    assert (selection.samples_other_splits, selection.samples_too_short, selection.samples_scored) == (
        3,
        1,
        16,
    )
    subset = pd.read_parquet(tmp_path / "gaze" / "index.parquet")
    assert set(subset["split"]) == {"train"}
    stats = [json.loads(p.read_text()) for p in (tmp_path / "gaze" / "shards").glob("*.stats.json")]
    assert {s["split"] for s in stats} == {"train"}


def test_stage2_span_follows_the_stage2_config_and_overlays(tmp_path: Path) -> None:
    assert stage2_span() == 181
    assert stage2_span([REPO / "configs" / "train" / "tiny.yaml"]) == (4 - 1) * 12 + 1
    overlay = tmp_path / "o.yaml"
    overlay.write_text("data: {num_frames: 8, stride: 3}\n")
    assert stage2_span([overlay]) == 22


def test_select_refuses_a_missing_build_and_conflicting_rules(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build the shards first"):
        run_select(tmp_path, min_frames=1)
    with pytest.raises(ValueError, match="not both"):
        run_select(tmp_path, top=0.1, threshold=1.0, min_frames=1)


def test_a_build_without_samples_gives_an_empty_subset(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    merge_index(tmp_path, tmp_path / "shards")
    selection, written = run_select(tmp_path, min_frames=1)
    assert written and selection.selected == 0
    assert len(pd.read_parquet(tmp_path / "gaze" / "index.parquet")) == 0


@pytest.mark.slow
def test_select_cli_on_a_real_build(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    out = small_gaze_build(tmp_path_factory, tmp_path / "out")
    index = pd.read_parquet(out / "index.parquet")
    assert index["gaze_robust_spread_deg"].notna().all()
    done = cli("select", "--out", str(out), "--min-frames", "8")
    assert done.returncode == 0, done.stderr
    sub = pd.read_parquet(out / "gaze" / "index.parquet")
    train = index[index["split"] == "train"]
    best = train["gaze_robust_spread_deg"].max()
    assert len(sub) >= 1 and set(sub["key"]) == set(train.loc[train["gaze_robust_spread_deg"] == best, "key"])
    sample = members_of(out / "gaze" / "shards")
    assert contract.decode_gaze(sample[f"{sub['key'][0]}.gaze.npy"]).shape[1] == 2
    before = snapshot(out)
    again = cli("select", "--out", str(out), "--min-frames", "8")
    assert again.returncode == 0 and "unchanged" in again.stderr and snapshot(out) == before
    assert cli("select", "--out", str(out), "--top", "0.5", "--min-frames", "8").returncode == 0
    assert len(pd.read_parquet(out / "gaze" / "index.parquet")) >= len(train) // 2
