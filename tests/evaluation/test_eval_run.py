"""`python -m evaluation run` end to end: a tiny MegActor checkpoint on held-out clips of real-format
shards (the shard writer's own members, split `test`), self and cross reenactment."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.video import probe_video

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))  # the trainer tests' synthetic shard writer
sys.path.insert(0, str(REPO / "tests"))  # the S3 server helper

from s3_helpers import aws_environment, moto_server, object_keys, s3_client  # noqa: E402
from shard_helpers import write_synthetic_shards  # noqa: E402

from pipeline import storage  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.loading import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two train clips and three held-out test clips (keys clip10-12), 64², 12 frames."""
    out = tmp_path_factory.mktemp("shards_out")
    write_synthetic_shards(out, samples=2, shards=1, frames=12, size=64, split="train")
    write_synthetic_shards(out, samples=3, shards=1, frames=12, size=64, split="test", first=10)
    return out


def test_training_validation_metrics_on_held_out_clips(model_dir: Path, shards: Path) -> None:
    """validation.eval_every's numbers: PSNR / SSIM / L1 of K held-out clips sampled in a few steps."""
    from model.loading import load_megactor
    from train.config import ValidationConfig
    from train.data import DataConfig, fixed_batch
    from train.validation import held_out_metrics

    data = DataConfig(root=str(shards), split="test", num_frames=3, stride=1, resolution=64, num_workers=0)
    batch = fixed_batch(data, 2)
    config = ValidationConfig(eval_clips=2, eval_steps=1)
    model = load_megactor(model_dir)
    first = held_out_metrics(model, batch, config)
    assert set(first) == {"psnr", "ssim", "l1"} and all(math.isfinite(v) for v in first.values())
    assert 0 < first["l1"] <= 1 and first["ssim"] <= 1
    assert held_out_metrics(model, batch, config) == first  # seeded sampling: the same numbers again


@pytest.mark.slow
def test_run_scores_a_checkpoint_on_a_protocol_file(
    tmp_path: Path, tiny_eval_weights: Path, model_dir: Path, shards: Path
) -> None:
    """run --protocol FILE: the file's clips, frames, pairs and backend; one progress line per clip, the
    results line last, the file's hash in metrics.json, labelled grid panels."""
    from evaluation.protocol import make_benchmark, write_benchmark

    benchmark = make_benchmark(str(shards), "test", num_clips=2, num_frames=4, resolution=64, backend="dlib")
    write_benchmark(benchmark, tmp_path / "bench.json")
    out = tmp_path / "eval"
    cmd = [
        sys.executable, "-m", "evaluation", "run", "--checkpoint", str(model_dir / "megactor"),
        "--model-weights-dir", str(model_dir), "--protocol", str(tmp_path / "bench.json"), "--steps", "2",
        "--weights-dir", str(tiny_eval_weights), "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["clips"] == ["synthetic__clip10__s000", "synthetic__clip11__s000"]  # test split only
    assert summary["protocol_file"]["hash"] == benchmark.hash and summary["self"]["backend"] == "dlib"
    assert result.stdout.strip().splitlines()[-1] == f"results: {out / 'results.md'}"
    for number, name in enumerate(["self:synthetic__clip10__s000", "self:synthetic__clip11__s000"], 1):
        assert f"clip {number}/4 {name}: done" in result.stderr
    for setting in ("self", "cross"):
        metrics, skipped = summary[setting]["metrics"], summary[setting]["skipped"]
        for name, value in metrics.items():  # a number, or a recorded reason
            assert (value is not None and math.isfinite(value)) or skipped.get(name), (setting, name)
    self_metrics = summary["self"]["metrics"]
    for name in ("psnr", "ssim", "l1", "lpips", "fid_n8"):  # 8 frames: below FID's protocol N
        assert math.isfinite(self_metrics[name]), name
    assert summary["self"]["distribution"]["fvd"]["short_videos_skipped"] == 2  # 4 < 16 frames
    assert "no ground-truth" in summary["cross"]["skipped"]["psnr"]
    frames = pd.read_parquet(out / "frames.parquet")
    assert set(frames["setting"]) == {"self", "cross"} and len(frames) == 2 * 2 * 4
    assert "| self |" in (out / "results.md").read_text() and "| self |" in result.stdout
    grid = probe_video(out / "grids" / "self_00.mp4")
    assert (grid.num_frames, grid.width, grid.height) == (4, 4 * 64, 64)  # reference|driving|generated|truth


@pytest.mark.slow
def test_run_reads_and_writes_object_storage(
    tmp_path: Path, tiny_eval_weights: Path, model_dir: Path, shards: Path
) -> None:
    """Checkpoint and shards in S3 (a real S3 API server), results written there: no local copy step."""
    with moto_server() as endpoint, aws_environment(endpoint):
        s3_client().create_bucket(Bucket="eval")
        storage.upload_tree(model_dir / "megactor", "s3://eval/run/megactor")
        storage.upload_tree(shards, "s3://eval/shards")
        cmd = [
            sys.executable, "-m", "evaluation", "run", "--checkpoint", "s3://eval/run/megactor",
            "--model-weights-dir", str(model_dir), "--shards", "s3://eval/shards", "--split", "test",
            "--num-clips", "2", "--num-frames", "4", "--stride", "1", "--steps", "1", "--resolution", "64",
            "--grid-clips", "1", "--backend", "dlib", "--weights-dir", str(tiny_eval_weights), "--device", "cpu",
            "--out", "s3://eval/results",
        ]  # fmt: skip
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert object_keys("eval", "results/") == [
            "results/frames.parquet", "results/grids/self_00.mp4", "results/metrics.json", "results/results.md",
        ]  # fmt: skip
        summary = json.loads(storage.read_text("s3://eval/results/metrics.json"))
        assert summary["clips"] == ["synthetic__clip10__s000", "synthetic__clip11__s000"]
        assert math.isfinite(summary["self"]["metrics"]["psnr"])
        assert len(storage.read_parquet("s3://eval/results/frames.parquet")) == 2 * 4
