"""The loader on the demo shards (`make shards` output): the stage-1 mix and the stage-2 gaze subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds

from model.preprocess import grayscale3, to_model_pixels
from pipeline import contract
from pipeline.video import read_video_frames
from train.augment import black_outside
from train.data import DataConfig, fixed_batch, list_shards, make_loader

pytestmark = pytest.mark.slow

NO_JITTER = {"scale_jitter": [1.0, 1.0], "aspect_jitter": [1.0, 1.0]}


def raw_by_key(config: DataConfig) -> dict[str, dict]:
    return {s["__key__"]: s for url in list_shards(config) for s in wds.WebDataset(url, shardshuffle=False)}


def masked_gray(frames: np.ndarray, face: np.ndarray, indices: list[int]) -> torch.Tensor:
    """What the driving input of frames[indices] must be without jitter: face-masked grayscale."""
    return to_model_pixels(grayscale3(black_outside(frames[indices], face[indices])))


def check_batch(batch: dict, config: DataConfig) -> None:
    """Every sample against a full decode of its shard members at the indices the batch reports."""
    raws = raw_by_key(config)
    count, frames, size = len(batch["key"]), config.num_frames, config.resolution
    assert batch["target"].shape == batch["driving"].shape == (count, frames, 3, size, size)
    assert batch["reference"].shape == (count, 3, size, size)
    assert batch["background_mask"].shape == (count, 1, size, size)
    for i, key in enumerate(batch["key"]):
        raw = raws[key]
        indices = batch["frame_indices"][i].tolist()
        ref = int(batch["reference_index"][i])
        assert np.diff(indices).tolist() == [config.stride] * (frames - 1)
        real = read_video_frames(raw[contract.REAL])
        face, fg = contract.decode_mask(raw[contract.FACE_MASK]), contract.decode_mask(raw[contract.FG_MASK])
        assert torch.equal(batch["target"][i], to_model_pixels(real[indices]))
        assert torch.equal(batch["reference"][i], to_model_pixels(real[[ref]])[0])
        assert torch.equal(batch["background_mask"][i, 0], torch.from_numpy(~fg[ref]).float())
        # the driving frames are the bucket's video at exactly the target's indices, face-masked grayscale
        member = contract.VIDEO_MEMBER_OF_BUCKET[batch["bucket"][i]]
        driving = batch["driving"][i]
        assert torch.equal(driving, masked_gray(read_video_frames(raw[member]), face, indices))
        assert (driving.permute(1, 0, 2, 3)[:, ~torch.from_numpy(face[indices])] == -1).all()
        # ... and match the real frames at the same indices better than at the neighbouring ones
        last = len(real) - 1
        error = (driving - masked_gray(real, face, indices)).abs().mean()
        for shift in (-1, 1):
            shifted = [min(max(t + shift, 0), last) for t in indices]
            assert error < (driving - masked_gray(real, face, shifted)).abs().mean(), (key, shift)


def test_stage1_batch_from_the_demo_shards(demo_out: Path) -> None:
    config = DataConfig(root=str(demo_out), num_frames=16, stride=2, resolution=256, **NO_JITTER)
    index = pd.read_parquet(demo_out / "index.parquet")
    every_sample = fixed_batch(config, int((index["split"] == "train").sum()))  # every train sample
    assert set(every_sample["bucket"]) == {"real", "swap", "style"}
    check_batch(every_sample, config)
    loader_config = DataConfig(
        root=str(demo_out),
        num_frames=16,
        stride=2,
        resolution=64,
        batch_size=2,
        num_workers=2,
        steps_per_epoch=3,
    )
    batches = list(make_loader(loader_config, seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 3
    assert all(
        b["driving"].shape == (2, 16, 3, 64, 64) and b["target"].shape == (2, 16, 3, 64, 64) for b in batches
    )
    assert sum(b["stats"]["bad_samples"] + b["stats"]["too_short"] for b in batches) == 0


def test_stage2_batch_from_the_gaze_subset(demo_out: Path) -> None:
    config = DataConfig(
        root=str(demo_out / "gaze"), num_frames=4, stride=12, resolution=256, steps_per_epoch=2, num_workers=0
    )
    assert config.span == 37  # the gaze sample has 43 frames
    jittered = list(make_loader(config, seed=0, epoch=0, rank=0, world_size=1))
    assert len(jittered) == 2 and jittered[0]["driving"].shape == (1, 4, 3, 256, 256)
    check_batch(fixed_batch(DataConfig(**{**vars(config), **NO_JITTER}), 1), config)
