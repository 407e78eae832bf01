"""The trainer's data loader on small synthetic shards whose frames carry their own index."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from shard_helpers import (
    FACE_GREY,
    face_grey,
    face_mask_of,
    fg_mask_of,
    read_code,
    synthetic_frame,
    write_synthetic_shards,
)

from model.preprocess import grayscale3, to_model_pixels
from pipeline import contract
from pipeline.video import EncodeSettings, IndexedVideo, encode_mp4, read_frames_at, read_video_frames
from pipeline.writer import STATS_SUFFIX, TAR_MTIME
from train.augment import Jitter, black_outside, jitter_frames, model_pixels
from train.data import DataConfig, NoShards, decode_sample, fixed_batch, list_shards, make_loader

NO_JITTER = {"scale_jitter": [1.0, 1.0], "aspect_jitter": [1.0, 1.0]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 samples (real, swap, style twice), 38-42 frames at 64², in 2 committed shards."""
    return write_synthetic_shards(tmp_path_factory.mktemp("synthetic"))


def config_for(folder: Path, **overrides) -> DataConfig:
    fields = {
        "shards": str(folder),
        "num_frames": 8,
        "stride": 3,
        "resolution": 64,
        "batch_size": 2,
        "num_workers": 0,
        "shuffle_buffer": 4,
        "steps_per_epoch": 4,
        **overrides,
    }
    return DataConfig(**fields)


def raw_samples(folder: Path) -> list[dict]:
    return [s for url in sorted(folder.glob("*.tar")) for s in wds.WebDataset(str(url), shardshuffle=False)]


def signature(batches: list[dict]) -> list[tuple]:
    return [(b["key"], b["frame_indices"].tolist(), b["reference_index"].tolist()) for b in batches]


def summed_stats(batches: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for batch in batches:
        for name, count in batch["stats"].items():
            total[name] = total.get(name, 0) + count
    return total


def copy_committed(shard: Path, folder: Path) -> Path:
    """Copy a shard and its stats marker into `folder`; returns the tar's copy."""
    folder.mkdir(parents=True, exist_ok=True)
    stats = shard.with_name(shard.name[: -len(".tar")] + STATS_SUFFIX)
    shutil.copy(stats, folder / stats.name)
    return Path(shutil.copy(shard, folder / shard.name))


def test_read_frames_at_equals_a_full_decode() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    clip = np.stack(
        [
            np.stack([np.sin(xx / 7 + t / 5) * 90 + 128, (xx * 3 + t * 2) % 256, (yy * 2 + t * 5) % 256], -1)
            for t in range(70)
        ]
    ).astype(np.uint8)
    data = encode_mp4(clip, 25.0, EncodeSettings(gop=16))
    full = read_video_frames(data, threads=1)
    index_sets = [
        [0],
        [69],
        [15, 16, 17],
        [40, 2, 40, 65],
        list(range(3, 70, 12)),
        [31, 30, 29],
        list(range(70)),
    ]
    rng = random.Random(0)
    index_sets += [[rng.randrange(70) for _ in range(rng.randint(1, 17))] for _ in range(30)]
    for indices in index_sets:
        assert np.array_equal(read_frames_at(data, indices), full[indices]), indices
    with IndexedVideo(data) as video:
        assert video.num_frames == 70
        for indices in ([50], [3], [69, 68], [0, 69]):  # one reader, jumping back and forth
            assert np.array_equal(video.read(indices), full[indices])
        with pytest.raises(ValueError, match="outside"):
            video.read([70])


def test_decode_mask_frames_unpacks_the_asked_frames() -> None:
    mask = np.random.default_rng(0).random((9, 7, 5)) > 0.5  # 35 bits a frame: frames straddle bytes
    data = contract.encode_mask(mask)
    assert np.array_equal(contract.decode_mask_frames(data, [8, 0, 3, 3]), mask[[8, 0, 3, 3]])
    with pytest.raises(ValueError, match="outside"):
        contract.decode_mask_frames(data, [9])


def test_list_shards_lists_committed_shards_only(shards: Path, tmp_path: Path) -> None:
    committed = sorted(str(p) for p in shards.glob("*.tar"))
    assert list_shards(DataConfig(root=str(shards.parent), shards="shards")) == committed
    assert list_shards(DataConfig(shards=str(shards / "shard-*.tar"))) == committed
    folder = tmp_path / "partial"
    copy_committed(Path(committed[0]), folder)
    shutil.copy(committed[1], folder / Path(committed[1]).name)  # a tar without its stats marker
    assert list_shards(DataConfig(shards=str(folder))) == [str(folder / Path(committed[0]).name)]
    (folder / (Path(committed[0]).name[: -len(".tar")] + STATS_SUFFIX)).unlink()
    with pytest.raises(FileNotFoundError, match=str(folder)):
        list_shards(DataConfig(shards=str(folder)))
    with pytest.raises(FileNotFoundError, match="missing"):
        list_shards(DataConfig(root=str(tmp_path), shards="missing"))


def test_decoded_sample_is_aligned_masked_and_grayscale(shards: Path) -> None:
    config = config_for(shards, **NO_JITTER)
    rng = random.Random(0)
    buckets = set()
    for raw in raw_samples(shards):
        for _ in range(3):
            sample = decode_sample(raw, config, rng)
            indices = sample["frame_indices"].tolist()
            ref = sample["reference_index"]
            buckets.add(sample["bucket"])
            assert sample["target"].shape == sample["driving"].shape == (8, 3, 64, 64)
            assert sample["reference"].shape == (3, 64, 64) and sample["background_mask"].shape == (1, 64, 64)
            assert all(
                t.dtype == torch.float32 for t in (sample["target"], sample["driving"], sample["reference"])
            )
            assert np.diff(indices).tolist() == [3] * 7 and indices[0] >= 0 and indices[-1] < 44
            # every target and driving frame carries the index the loader says it has
            assert [read_code(f.numpy()) for f in sample["target"]] == indices
            assert [read_code(f.numpy()) for f in sample["driving"]] == indices
            assert read_code(sample["reference"].numpy()) == ref
            # the driving frames come from the bucket's video, face-masked and grayscale
            member = contract.VIDEO_MEMBER_OF_BUCKET[sample["bucket"]]
            assert all(abs(face_grey(f.numpy()) - FACE_GREY[member]) < 8 for f in sample["driving"])
            driving = sample["driving"]
            assert torch.equal(driving[:, 0], driving[:, 1]) and torch.equal(driving[:, 0], driving[:, 2])
            for frame, t in zip(driving, indices, strict=True):
                outside = ~torch.from_numpy(face_mask_of(t, 64))
                assert (frame[:, outside] == -1).all()  # exactly black outside the face
                band = frame[0, 56:, (t % 8) * 8 : (t % 8) * 8 + 8]
                assert band.mean() > 0.5  # the band cell inside frame t's face mask stays bright
            expected_background = torch.from_numpy(~fg_mask_of(ref, 64)).float()
            assert torch.equal(sample["background_mask"][0], expected_background)
            for image in (sample["target"], sample["driving"], sample["reference"]):
                assert image.min() >= -1 and image.max() <= 1
    assert buckets == {"real", "swap", "style"}


def test_jitter_resizes_and_pastes_centred_or_crops() -> None:
    white = np.full((2, 64, 64, 3), 255, np.uint8)
    small = jitter_frames(white, 64, Jitter(scale=0.5, aspect=1.0))
    assert small.shape == (2, 64, 64, 3)
    assert (small[:, 16:48, 16:48] == 255).all() and small[:, :16].max() == 0 and small[:, :, 48:].max() == 0
    wide = jitter_frames(white, 64, Jitter(scale=0.5, aspect=1.5))  # 48 wide, 32 high
    assert (wide[:, 16:48, 8:56] == 255).all() and wide[:, :, :8].max() == 0 and wide[:, :16].max() == 0
    frame = synthetic_frame(5, 64)[None]
    cropped = jitter_frames(frame, 64, Jitter(scale=1.0, aspect=1.5))  # 96 wide: centre 64 columns kept
    assert cropped.shape == (1, 64, 64, 3) and cropped[0, 40, 0].tolist() != [0, 0, 0]
    assert np.array_equal(jitter_frames(frame, 64, Jitter()), frame)


def test_jitter_moves_the_driving_face_but_not_the_target(shards: Path) -> None:
    config = config_for(shards, scale_jitter=[0.5, 0.5], aspect_jitter=[1.0, 1.0])
    sample = decode_sample(raw_samples(shards)[0], config, random.Random(1))
    assert (sample["driving"][:, :, :16] == -1).all() and (sample["driving"][:, :, 48:] == -1).all()
    assert [read_code(f.numpy()) for f in sample["target"]] == sample["frame_indices"].tolist()


def test_frames_are_resized_to_the_configured_resolution(shards: Path) -> None:
    config = config_for(shards, resolution=32, steps_per_epoch=1, **NO_JITTER)
    batch = next(iter(make_loader(config, seed=0, epoch=0, rank=0, world_size=1)))
    assert batch["target"].shape == batch["driving"].shape == (2, 8, 3, 32, 32)
    assert batch["reference"].shape == (2, 3, 32, 32) and batch["background_mask"].shape == (2, 1, 32, 32)
    assert set(batch["background_mask"].unique().tolist()) <= {0.0, 1.0}
    for frames, indices in zip(batch["target"], batch["frame_indices"], strict=True):
        assert [read_code(f.numpy()) for f in frames] == indices.tolist()


def test_loader_yields_exactly_steps_per_epoch_batches(shards: Path) -> None:
    for workers, steps in ((0, 3), (2, 5)):
        loader = make_loader(
            config_for(shards, num_workers=workers, steps_per_epoch=steps),
            seed=0,
            epoch=0,
            rank=0,
            world_size=1,
        )
        batches = list(loader)
        assert len(loader) == steps and len(batches) == steps
        assert all(len(b["key"]) == 2 for b in batches)
        assert summed_stats(batches)["samples"] >= 2 * steps


def test_stream_is_deterministic_and_differs_by_epoch_and_rank(shards: Path) -> None:
    def run(workers: int, epoch: int = 0, rank: int = 0) -> list[dict]:
        config = config_for(
            shards, num_workers=workers, steps_per_epoch=5, batch_size=1
        )  # 3 + 2 with 2 workers
        return list(make_loader(config, seed=7, epoch=epoch, rank=rank, world_size=2))

    first, again = run(0), run(0)
    assert signature(first) == signature(again)
    assert all(torch.equal(a["driving"], b["driving"]) for a, b in zip(first, again, strict=True))
    two_workers = run(2)
    assert signature(two_workers) == signature(run(2))
    assert all(torch.equal(a["target"], b["target"]) for a, b in zip(two_workers, run(2), strict=True))
    assert signature(run(0, epoch=1)) != signature(first)
    assert signature(run(0, rank=1)) != signature(first)


def test_too_short_clips_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = write_synthetic_shards(tmp_path, samples=4, shards=1, lengths=[40, 10, 40, 12])
    short = {contract.sample_key("synthetic", f"clip{i:02d}", 0) for i in (1, 3)}
    batches = list(make_loader(config_for(folder, steps_per_epoch=6), seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 6
    assert not short & {key for b in batches for key in b["key"]}
    stats = summed_stats(batches)
    assert stats["too_short"] > 0 and stats["bad_samples"] == 0
    assert stats["samples"] == stats["too_short"] + 12  # every sample read is used (12) or counted


def test_truncated_shard_and_missing_member_are_counted_not_fatal(shards: Path, tmp_path: Path) -> None:
    folder = tmp_path / "damaged"
    good, bad = (copy_committed(p, folder) for p in sorted(shards.glob("*.tar")))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member, past the first samples
    incomplete = folder / "shard-incomplete.tar"  # the first sample of `good` without its face mask
    with wds.TarWriter(str(incomplete), encoder=False, mtime=TAR_MTIME) as writer:
        sample = raw_samples(shards)[0]
        writer.write({k: v for k, v in sample.items() if k not in (contract.FACE_MASK, "__url__")})
    incomplete.with_suffix(STATS_SUFFIX).write_text(json.dumps({"shard": incomplete.name}))
    config = config_for(folder, steps_per_epoch=8, log_every=1)
    batches = list(make_loader(config, seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 8
    stats = summed_stats(batches)
    assert stats["bad_samples"] >= 1 and stats["missing_member"] >= 1


def test_fixed_batch_takes_the_first_usable_samples_in_order(shards: Path) -> None:
    config = config_for(shards, num_frames=10, stride=4)  # 37 frames: the 38-frame clips only just fit
    batch = fixed_batch(config, 3, seed=0)
    expected = [s["__key__"] for s in raw_samples(shards)][:3]
    assert batch["key"] == expected and batch["target"].shape == (3, 10, 3, 64, 64)
    again = fixed_batch(config, 3, seed=0)
    assert torch.equal(batch["driving"], again["driving"]) and torch.equal(batch["target"], again["target"])
    other = fixed_batch(config, 3, seed=1)
    assert other["key"] == expected and signature([other]) != signature([batch])
    with pytest.raises(ValueError, match="asked for 7"):
        fixed_batch(config, 7)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="data.scale_jitter"):
        DataConfig(scale_jitter=[1.0, 0.5])
    with pytest.raises(ValueError, match="data.stride"):
        DataConfig(stride=0)


def test_pixel_helpers_match_the_model_preprocessing() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    assert torch.equal(model_pixels(frames), to_model_pixels(frames))
    assert model_pixels(frames).is_contiguous()
    mask = np.random.default_rng(2).random((3, 16, 24)) > 0.5
    assert np.array_equal(black_outside(frames, mask), np.where(mask[..., None], frames, 0))


def test_a_dark_reference_is_redrawn(shards: Path) -> None:
    # A frame's brightness grows with the number of white code cells (set bits of its index).
    luma = {t: float(grayscale3(synthetic_frame(t, 64)[None])[0, ..., 0].mean()) for t in range(38)}
    threshold = (
        min(v for t, v in luma.items() if t.bit_count() == 3)
        + max(v for t, v in luma.items() if t.bit_count() == 2)
    ) / 2
    raw = raw_samples(shards)[0]

    def bright_share(min_luma: float) -> float:
        config = config_for(shards, min_reference_luma=min_luma, **NO_JITTER)
        rng = random.Random(0)
        references = [decode_sample(raw, config, rng)["reference_index"] for _ in range(60)]
        return sum(luma[t] > threshold for t in references) / len(references)

    assert bright_share(0.0) < 0.65  # 18 of the first 38 frames have 3 or more bits set
    assert bright_share(threshold) > 0.85  # up to 4 draws: 1 - (20/38)^4 = 0.92


def test_list_shards_keeps_the_split_asked_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_synthetic_shards(tmp_path, samples=2, shards=2, frames=20, split="train")
    write_synthetic_shards(tmp_path, samples=1, shards=1, frames=20, split="val", first=10)
    train, val = list_shards(config_for(folder)), list_shards(config_for(folder, split="val"))
    assert (len(train), len(val)) == (2, 1) and not set(train) & set(val)
    assert [s["__key__"] for s in wds.WebDataset(val[0], shardshuffle=False)] == [
        contract.sample_key("synthetic", "clip10", 0)
    ]
    with pytest.raises(NoShards, match="'test'"):
        list_shards(config_for(folder, split="test"))
    legacy = write_synthetic_shards(tmp_path / "legacy", samples=1, shards=1, frames=20)
    for stats_path in legacy.glob("*.stats.json"):  # a shard set written before splits existed
        stats = json.loads(stats_path.read_text())
        del stats["split"]
        stats_path.write_text(json.dumps(stats))
    with caplog.at_level("WARNING", logger="train.data"):
        assert len(list_shards(config_for(legacy))) == 1
    assert "no split" in caplog.text
    with pytest.raises(NoShards):
        list_shards(config_for(legacy, split="val"))


def test_a_window_reference_is_one_of_the_window_frames(shards: Path) -> None:
    """reference=window (the paper): one frame of the 8-frame window is the reference, the other 7 the
    targets and driving frames; reference=segment draws it from the whole segment."""
    config = config_for(shards, reference="window", **NO_JITTER)
    rng = random.Random(0)
    positions = set()
    for raw in raw_samples(shards):
        for _ in range(4):
            sample = decode_sample(raw, config, rng)
            indices, ref = sample["frame_indices"].tolist(), sample["reference_index"]
            window = sorted([*indices, ref])
            assert len(indices) == 7 and sample["target"].shape[0] == sample["driving"].shape[0] == 7
            assert np.diff(window).tolist() == [3] * 7 and ref not in indices
            positions.add(window.index(ref))
            assert [read_code(f.numpy()) for f in sample["target"]] == indices
            assert [read_code(f.numpy()) for f in sample["driving"]] == indices
            assert read_code(sample["reference"].numpy()) == ref
    assert len(positions) > 3  # drawn, not a fixed slot
    segment = config_for(shards, **NO_JITTER)
    outside = 0
    for raw in raw_samples(shards):
        sample = decode_sample(raw, segment, rng)
        span = sample["frame_indices"].tolist()
        outside += not span[0] <= sample["reference_index"] <= span[-1]
    assert outside > 0
