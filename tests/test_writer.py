from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from pipeline import contract
from pipeline.rows import batch_to_rows, guarded, rows_to_batch
from pipeline.stages.base import Stage
from pipeline.video import EncodeSettings, read_video_frames
from pipeline.writer import (
    TAR_MTIME,
    as_writer_row,
    committed_keys,
    encode_members,
    merge_index,
    remove_uncommitted,
    write_shard,
)


def decoded_row(key: str, bucket: str = "real", frames: int = 4) -> dict:
    pixels = np.zeros((frames, 32, 32, 3), np.uint8)
    pixels[:, 8:24, 8:24] = 200
    return {
        "key": key, "clip_id": key, "dataset": "vfhq", "identity": "p", "source": "/src", "source_kind": "frames",
        "fps": 25.0, "segment": 0, "frame_start": 0, "frame_stop": frames, "width": 32, "height": 32,
        "face_boxes": "", "bucket": bucket, "frames": pixels, "crop_box": "[0, 0, 32, 32]", "num_frames": frames,
        "error_stage": "", "error": "", "message": "", "timings": "{}", "annotations": "[]",
    }  # fmt: skip


def encoded(row: dict) -> dict:
    return encode_members(row, resolution=32, video=EncodeSettings())


def test_write_shard_commits_tar_index_and_stats(tmp_path: Path) -> None:
    masked = decoded_row("b", bucket="swap")
    masked["face_mask"] = np.ones((4, 32, 32), bool)
    masked["driving_frames"] = masked["frames"].copy()
    masked["annotations"] = json.dumps(["face_mask", "swap"])
    failed = as_writer_row(dict(decoded_row("c"), error_stage="decode", error="ValueError", message="bad"))
    name = write_shard([encoded(decoded_row("a")), encoded(masked), failed], tmp_path)
    assert name is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.tar", f"{name}.index.parquet", f"{name}.stats.json"]
    )
    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / f"{name}.tar"), shardshuffle=False)}
    assert sorted(samples) == ["a", "b"]
    assert set(samples["b"]) >= {"real.mp4", "swap.mp4", "face.npz", "json"}
    assert read_video_frames(samples["a"]["real.mp4"]).shape == (4, 32, 32, 3)
    assert contract.decode_mask(samples["b"]["face.npz"]).all()
    meta = contract.SampleMeta.from_json_bytes(samples["b"]["json"])
    assert meta.bucket == "swap" and contract.required_members(meta) <= set(samples["b"]) | {"json"}
    stats = json.loads((tmp_path / f"{name}.stats.json").read_text())
    assert (
        stats["samples"] == 2
        and stats["keys"] == ["a", "b"]
        and stats["failures"] == {"decode/ValueError": 1}
    )
    assert stats["buckets"] == {"real": 1, "swap": 1} and stats["frames"] == 8
    index = pd.read_parquet(tmp_path / f"{name}.index.parquet")
    assert list(index["key"]) == ["a", "b"] and (index["size_real_mp4"] > 0).all()


def test_shards_are_reproducible(tmp_path: Path) -> None:
    rows = [encoded(decoded_row("a")), encoded(decoded_row("b"))]
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    first, second = write_shard(rows, tmp_path / "1"), write_shard(rows, tmp_path / "2")
    assert first == second
    assert (tmp_path / "1" / f"{first}.tar").read_bytes() == (tmp_path / "2" / f"{second}.tar").read_bytes()


def test_shards_are_byte_identical_to_webdatasets_tar_writer(tmp_path: Path) -> None:
    """The writer lays samples out itself (no torch in write tasks); WebDataset's own TarWriter with the
    same mtime gives the same bytes."""
    rows = [encoded(decoded_row("a")), encoded(decoded_row("b", bucket="swap"))]
    name = write_shard(rows, tmp_path)
    reference = tmp_path / "reference.tar"
    with open(reference, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=TAR_MTIME) as tar:
        for row in rows:
            tar.write(
                {"__key__": row["key"], **{m: bytes(row[m]) for m in contract.ALL_MEMBERS if len(row[m])}}
            )
    assert (tmp_path / f"{name}.tar").read_bytes() == reference.read_bytes()


def test_all_failed_batch_writes_nothing(tmp_path: Path) -> None:
    failed = as_writer_row(dict(decoded_row("c"), error_stage="decode", error="E", message="m"))
    assert write_shard([failed], tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_uncommitted_files_are_removed_and_committed_kept(tmp_path: Path) -> None:
    name = write_shard([encoded(decoded_row("a"))], tmp_path)
    (tmp_path / "shard-0123456789abcdef.tar").write_bytes(b"renamed but never got its stats")
    (tmp_path / ".shard-0123456789abcdef.tar.tmp-1234").write_bytes(b"half written")
    removed = remove_uncommitted(tmp_path)
    assert sorted(removed) == [
        ".shard-0123456789abcdef.tar.tmp-1234",
        "shard-0123456789abcdef.tar",
    ]
    assert committed_keys(tmp_path) == {"a"} and (tmp_path / f"{name}.tar").exists()
    index = merge_index(tmp_path, tmp_path)
    assert list(index["key"]) == ["a"] and (tmp_path / "index.parquet").exists()


class Doubler(Stage):
    """A stage for the interface tests: doubles pixels of swap rows, fails on key 'bad'."""

    name = "doubler"
    buckets = ("swap",)
    outputs = {"doubled": False}

    def process(self, row):
        if row["key"] == "bad":
            raise RuntimeError("cannot double this one")
        row["frames"] = row["frames"] * 2
        row["doubled"] = True
        return row


def test_stage_gates_buckets_records_failures_and_keeps_batches_rectangular() -> None:
    rows = [decoded_row("r", "real"), decoded_row("s", "swap"), decoded_row("bad", "swap")]
    out = batch_to_rows(Doubler()(rows_to_batch(rows)))
    by_key = {row["key"]: row for row in out}
    assert by_key["r"]["frames"].max() == 200 and not by_key["r"]["doubled"]
    assert by_key["s"]["frames"].max() == 144 and by_key["s"]["doubled"]  # uint8 wraps: 400 % 256
    assert json.loads(by_key["s"]["annotations"]) == ["doubler"] and "doubler" in by_key["s"]["timings"]
    assert (by_key["bad"]["error_stage"], by_key["bad"]["error"]) == ("doubler", "RuntimeError")
    assert "cannot double" in by_key["bad"]["message"] and by_key["bad"]["frames"].size == 0


def test_guarded_step_passes_failed_rows_through() -> None:
    calls = []
    step = guarded("probe", lambda row: calls.append(row["key"]) or row)
    step(dict(decoded_row("x"), error_stage="decode", error="E", message="m"))
    step(decoded_row("y"))
    assert calls == ["y"]


def test_encode_failure_becomes_a_row_not_an_exception() -> None:
    step = guarded("encode", lambda row: encode_members(row, resolution=32, video=EncodeSettings()))
    row = decoded_row("odd")
    row["frames"] = np.zeros((2, 31, 31, 3), np.uint8)
    out = as_writer_row(step(row))
    assert out["error_stage"] == "encode" and "even sizes" in out["message"]
    with pytest.raises(KeyError):
        out["frames"]


def test_an_orphaned_writer_cannot_commit_after_a_newer_run_took_over(tmp_path: Path) -> None:
    from pipeline.writer import StaleRun

    lock = tmp_path / ".build.lock"
    lock.write_text("new-run")
    with pytest.raises(StaleRun, match="newer build"):
        write_shard([encoded(decoded_row("a"))], tmp_path, fence=(str(lock), "old-run"))
    assert [p.name for p in tmp_path.iterdir()] == [".build.lock"]  # nothing committed, nothing left
    assert write_shard([encoded(decoded_row("a"))], tmp_path, fence=(str(lock), "new-run"))


def test_a_batch_of_several_splits_becomes_one_shard_per_split(tmp_path: Path) -> None:
    from pipeline.writer import read_stats, write_shard_batch

    rows = [
        encoded(dict(decoded_row(f"k{i}"), split=split, labels='{"emotion": ["happy"]}'))
        for i, split in enumerate(["train", "val", "train", "test", "val"])
    ]
    status = write_shard_batch(rows_to_batch(rows), str(tmp_path))
    stats = {s["split"]: s for s in read_stats(tmp_path)}
    assert sorted(stats) == ["test", "train", "val"]
    assert stats["train"]["keys"] == ["k0", "k2"] and stats["val"]["keys"] == ["k1", "k4"]
    shard_of = dict(zip(status["key"], status["shard"], strict=True))
    assert shard_of["k0"] == shard_of["k2"] != shard_of["k1"]
    index = merge_index(tmp_path, tmp_path)
    assert dict(zip(index["key"], index["split"], strict=True)) == {
        "k0": "train",
        "k1": "val",
        "k2": "train",
        "k3": "test",
        "k4": "val",
    }
    assert set(index["emotion"]) == {"happy"}
    with pytest.raises(ValueError, match="one split"):
        write_shard(rows[:2], tmp_path)


@pytest.mark.parametrize("failed_first", [True, False])
def test_a_batch_mixing_healthy_and_failed_rows_keeps_every_field(failed_first: bool) -> None:
    """A stage adds `extra` and pixels to healthy rows only; the batch must carry the union of fields."""
    healthy = {
        "key": "a",
        "error_stage": "",
        "extra": '{"faces": 3}',
        "mask": np.ones((2, 4, 4), bool),
        "n": 2,
    }
    failed = {"key": "b", "error_stage": "decode"}
    rows = [failed, healthy] if failed_first else [healthy, failed]
    back = {row["key"]: row for row in batch_to_rows(rows_to_batch(rows))}
    assert (
        back["a"]["extra"] == '{"faces": 3}' and back["a"]["mask"].shape == (2, 4, 4) and back["a"]["n"] == 2
    )
    assert (
        back["b"]["extra"] == ""
        and back["b"]["mask"].shape == (0, 4, 4)
        and back["b"]["error_stage"] == "decode"
    )
