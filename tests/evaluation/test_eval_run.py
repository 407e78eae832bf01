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

from shard_helpers import write_synthetic_shards  # noqa: E402


@pytest.mark.slow
def test_run_scores_a_checkpoint_on_held_out_clips(tmp_path: Path, tiny_eval_weights: Path) -> None:
    from model.loading import write_tiny_weights

    model_dir = write_tiny_weights(tmp_path / "model", seed=0)
    shards = tmp_path / "shards_out"
    write_synthetic_shards(shards, samples=2, shards=1, frames=12, size=64, split="train")
    write_synthetic_shards(shards, samples=3, shards=1, frames=12, size=64, split="test", first=10)
    out = tmp_path / "eval"
    cmd = [
        sys.executable, "-m", "evaluation", "run", "--checkpoint", str(model_dir / "megactor"),
        "--model-weights-dir", str(model_dir), "--shards", str(shards), "--split", "test", "--num-clips", "2",
        "--num-frames", "4", "--stride", "1", "--steps", "2", "--resolution", "64", "--cross",
        "--backend", "dlib", "--weights-dir", str(tiny_eval_weights), "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["clips"] == ["synthetic__clip10__s000", "synthetic__clip11__s000"]  # test split only
    for setting in ("self", "cross"):
        metrics, skipped = summary[setting]["metrics"], summary[setting]["skipped"]
        for name, value in metrics.items():  # a number, or a recorded reason
            assert (value is not None and math.isfinite(value)) or skipped.get(name), (setting, name)
    self_metrics = summary["self"]["metrics"]
    for name in ("psnr", "ssim", "l1", "lpips", "fid", "fvd"):
        assert math.isfinite(self_metrics[name]), name
    assert "no ground-truth" in summary["cross"]["skipped"]["psnr"]
    frames = pd.read_parquet(out / "frames.parquet")
    assert set(frames["setting"]) == {"self", "cross"} and len(frames) == 2 * 2 * 4
    assert "| self |" in (out / "results.md").read_text() and "| self |" in result.stdout
    grid = probe_video(out / "grids" / "self_00.mp4")
    assert (grid.num_frames, grid.width, grid.height) == (4, 4 * 64, 64)  # reference|driving|generated|truth
