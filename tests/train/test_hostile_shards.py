"""The trainer's reader on shards it must not trust: every member is built here from its format's facts
(H.264 in mp4 through PyAV, .npy / zip headers, a tar written with tarfile), never by the shard writer."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import contract
from train.data import DataConfig, NoShards, SampleSkipped, decode_sample, list_shards, make_loader

REPO = Path(__file__).resolve().parent.parent.parent
SIZE, FRAMES = 64, 40  # what every sample's json says
GIB = 1 << 30
RSS_LIMIT_BYTES = GIB  # the reader's process, torch and PyAV loaded, with every hostile sample read
READ_RSS_LIMIT_BYTES = 256 << 20  # of which the reading (a GiB mask bomb among the samples)
CONFIG = {"num_frames": 8, "stride": 3, "resolution": SIZE, "batch_size": 1, "num_workers": 0}
CONFIG |= {"shuffle_buffer": 0, "steps_per_epoch": 1, "log_every": 1}


def mp4(size: int, frames: int) -> bytes:
    """H.264 in mp4, size² and `frames` bright frames, encoded with PyAV (libx264)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        ramp = np.linspace(60, 200, size, dtype=np.uint8)
        for t in range(frames):
            pixels = np.empty((size, size, 3), np.uint8)
            pixels[:] = ramp[:, None, None] + t  # 60..239: bright, no overflow
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """A .npy 1.0 header (magic, little-endian header length, dict literal padded to 64 bytes)."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def mask_npz(shape: tuple[int, int, int]) -> bytes:
    """The contract's mask: a zip of shape.npy (int64 [T,H,W]) and bits.npy (packbits of the mask)."""
    mask = np.zeros(shape, bool)
    mask[:, shape[1] // 4 : 3 * shape[1] // 4] = True
    buffer = io.BytesIO()
    np.savez_compressed(buffer, bits=np.packbits(mask, axis=None), shape=np.array(shape, np.int64))
    return buffer.getvalue()


def bomb_npz(shape: tuple[int, int, int], bits_header: bytes, bits_bytes: int) -> bytes:
    """A mask npz whose bits.npy is `bits_header` and `bits_bytes` zero bytes, deflated as a stream
    (deflate packs zeros ~1000:1, so a GiB of bits is a MB of zip)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("shape.npy", npy(np.array(shape, np.int64)))
        with archive.open("bits.npy", "w", force_zip64=True) as member:
            member.write(bits_header)
            chunk = bytes(1 << 20)
            for offset in range(0, bits_bytes, len(chunk)):
                member.write(chunk[: bits_bytes - offset])
    return buffer.getvalue()


def declare_size(npz: bytes, name: str, size: int) -> bytes:
    """The npz with `name`'s uncompressed size in its central directory record set to `size`
    (zip spec 4.3.12: signature PK\\1\\2, uncompressed size at offset 24, name length at 28, name at 46)."""
    data = bytearray(npz)
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        (name_length,) = struct.unpack_from("<H", data, start + 28)
        if data[start + 46 : start + 46 + name_length] == name.encode():
            struct.pack_into("<I", data, start + 24, size)
            return bytes(data)
        start += 4
    raise AssertionError(f"no {name} in the npz")


def meta(key: str, **fields: object) -> bytes:
    """The json member, from the contract's SampleMeta fields."""
    values = {
        "key": key, "clip_id": key, "dataset": "hostile", "identity": key, "source": "made/by/the/test",
        "fps": 25.0, "num_frames": FRAMES, "segment": 0, "frame_start": 0, "frame_stop": FRAMES,
        "crop_box": [0, 0, SIZE, SIZE], "resolution": SIZE, "bucket": "real", "split": "train",
        "annotations": ["face_mask", "foreground", "gaze"], "pipeline_version": "0",
        **fields,
    }  # fmt: skip
    return json.dumps(values).encode()


def good_members(key: str, frames: int = FRAMES) -> dict[str, bytes]:
    return {
        contract.REAL: mp4(SIZE, frames),
        contract.FACE_MASK: mask_npz((frames, SIZE, SIZE)),
        contract.FG_MASK: mask_npz((frames, SIZE, SIZE)),
        contract.GAZE: npy(np.zeros((frames, 2), np.float32)),
        contract.META: meta(key, num_frames=frames, frame_stop=frames),
    }


# key -> (what the reader must say about it, the stat it counts under)
EXPECTED = {
    "video_size": ("real.mp4 is 640x640, its json says 64x64", "bad_samples"),
    "video_frames": ("real.mp4 declares 30 frames, its json says 40", "bad_samples"),
    "swap_size": ("swap.mp4 is 640x640, its json says 64x64", "bad_samples"),
    "mask_gib_of_bits": ("face.npz: bits.npy is uint8 (1073741824,)", "bad_samples"),
    "mask_huge_shape": ("fg.npz: mask declares [40, 65536, 65536], expected [40, 64, 64]", "bad_samples"),
    "zip_declared_size": ("fg.npz: bits.npy declares 4294967040 bytes", "bad_samples"),
    "gaze_huge_shape": ("gaze.npy: gaze declares float32 [1000000000, 2]", "bad_samples"),
    "json_resolution": (
        "its json says resolution 65536, expected 1..2048 (data.max_sample_resolution)",
        "bad_samples",
    ),
    "json_frames": ("its json says 1000000 frames, expected 1..4096 (data.max_sample_frames)", "bad_samples"),
    "no_fg_mask": ("no fg.npz", "missing_member"),
    "short": ("10 frames", "too_short"),
}


def hostile_samples() -> dict[str, dict[str, bytes]]:
    """One sample per way a shard can lie (EXPECTED), then one good sample."""
    mask_bits = (FRAMES * SIZE * SIZE + 7) // 8
    huge = (FRAMES, 1 << 16, 1 << 16)
    samples = {key: good_members(key) for key in EXPECTED}
    samples["video_size"][contract.REAL] = mp4(640, FRAMES)
    samples["video_frames"][contract.REAL] = mp4(SIZE, 30)
    samples["swap_size"][contract.SWAP] = mp4(640, FRAMES)
    samples["swap_size"][contract.META] = meta("swap_size", bucket="swap", annotations=["swap"])
    samples["mask_gib_of_bits"][contract.FACE_MASK] = bomb_npz(
        (FRAMES, SIZE, SIZE), npy_header((GIB,), "|u1"), GIB
    )
    samples["mask_huge_shape"][contract.FG_MASK] = bomb_npz(
        huge, npy_header((huge[0] * huge[1] * huge[2] // 8,), "|u1"), mask_bits
    )
    samples["zip_declared_size"][contract.FG_MASK] = declare_size(
        mask_npz((FRAMES, SIZE, SIZE)), "bits.npy", 0xFFFFFF00
    )
    samples["gaze_huge_shape"][contract.GAZE] = npy_header((10**9, 2), "<f4") + bytes(8)
    samples["json_resolution"][contract.META] = meta("json_resolution", resolution=1 << 16)
    samples["json_frames"][contract.META] = meta("json_frames", num_frames=10**6, frame_stop=10**6)
    del samples["no_fg_mask"][contract.FG_MASK]
    samples["short"] = good_members("short", frames=10)
    samples["good"] = good_members("good")
    return samples


def write_shard(folder: Path, name: str, samples: dict[str, dict[str, bytes]], stats: bytes) -> Path:
    """A WebDataset tar (members `key.member`, in order) and its stats marker."""
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / f"{name}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / f"{name}.stats.json").write_bytes(stats)
    return tar_path


@pytest.fixture(scope="module")
def samples() -> dict[str, dict[str, bytes]]:
    return hostile_samples()


@pytest.fixture(scope="module")
def hostile_shard(samples: dict[str, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "shards"
    write_shard(folder, "hostile-000000", samples, json.dumps({"split": "train"}).encode())
    return folder


def raw_sample(samples: dict[str, dict[str, bytes]], key: str) -> dict[str, object]:
    return {"__key__": key, "__url__": "hostile-000000.tar", **samples[key]}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_a_lying_member_is_skipped_with_its_reason(samples: dict, key: str) -> None:
    message, reason = EXPECTED[key]
    with pytest.raises(SampleSkipped, match=re.escape(message)) as caught:
        decode_sample(raw_sample(samples, key), DataConfig(**CONFIG), random.Random(0))
    assert caught.value.reason == reason


def test_the_reader_skips_every_hostile_sample_in_bounded_memory(hostile_shard: Path) -> None:
    """The real loader, in its own process: the good sample comes out, each bad one is counted under its
    reason and logged with what is wrong, and the process's peak RSS stays under RSS_LIMIT_BYTES."""
    script = f"""
import json, logging, sys
from train.data import DataConfig, make_loader

def peak_rss():
    # VmHWM belongs to this process's memory map (ru_maxrss would carry the forking parent's peak).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
config = DataConfig(shards={str(hostile_shard)!r}, **{CONFIG!r})
loader = make_loader(config, seed=0, epoch=0, rank=0, world_size=1)
before = peak_rss()  # imports done
batch = next(iter(loader))
peak = peak_rss()
print(json.dumps({{"keys": batch["key"], "stats": batch["stats"], "before": before, "peak": peak}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["keys"] == ["good"]
    expected = {"samples": len(EXPECTED) + 1, "bad_samples": 0, "missing_member": 0, "too_short": 0}
    for _, reason in EXPECTED.values():
        expected[reason] += 1
    assert out["stats"] == expected
    for key, (message, _) in EXPECTED.items():
        assert any(key in line and message in line for line in result.stderr.splitlines()), (key, message)
    # Imports alone (torch, PyAV, OpenCV) take most of it; the reading itself must stay small too.
    peak, grown = out["peak"], out["peak"] - out["before"]
    assert peak < RSS_LIMIT_BYTES, f"peak RSS {peak / 1e6:.0f} MB"
    assert grown < READ_RSS_LIMIT_BYTES, f"reading grew the peak RSS by {grown / 1e6:.0f} MB"


def test_mask_frames_read_as_a_stream_match_the_mask() -> None:
    mask = np.random.default_rng(0).random((6, 16, 24)) > 0.5
    data = io.BytesIO()
    np.savez_compressed(data, bits=np.packbits(mask, axis=None), shape=np.array(mask.shape, np.int64))
    contract.check_mask_header(data.getvalue(), mask.shape)
    assert np.array_equal(contract.decode_mask_frames(data.getvalue(), [5, 0, 5, 2]), mask[[5, 0, 5, 2]])


def test_an_unreadable_stats_marker_leaves_its_shard_out(
    samples: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "shards"
    good = write_shard(folder, "a-000000", {"good": samples["good"]}, b'{"split": "train"}')
    write_shard(folder, "b-000000", {"good": samples["good"]}, b'{"split": "tr')  # cut mid-write
    write_shard(folder, "c-000000", {"good": samples["good"]}, b"[]")
    config = DataConfig(**{**CONFIG, "shards": str(folder)})
    with caplog.at_level(logging.WARNING, logger="train.data"):
        assert list_shards(config) == [str(good)]
    for name in ("b-000000.tar", "c-000000.tar"):  # one warning naming each shard left out
        named = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(named) == 1 and "stats marker is unreadable" in named[0], named
    batch = next(iter(make_loader(config, seed=0, epoch=0, rank=0, world_size=1)))
    assert batch["key"] == ["good"]

    good.with_name("a-000000.stats.json").write_bytes(b"\xff\xfe")
    with pytest.raises(NoShards, match="3 with an unreadable .stats.json"):
        list_shards(config)


def test_shuffle_buffer_zero_reads_in_shard_order(samples: dict, tmp_path: Path) -> None:
    keys = ["k0", "k1", "k2"]
    folder = tmp_path / "shards"
    write_shard(folder, "a-000000", {k: good_members(k) for k in keys}, b'{"split": "train"}')
    config = DataConfig(**{**CONFIG, "shards": str(folder), "steps_per_epoch": 3})
    batches = list(make_loader(config, seed=0, epoch=0, rank=0, world_size=1))
    assert [b["key"][0] for b in batches] == keys


@pytest.mark.parametrize("name", ["max_sample_resolution", "max_sample_frames"])
def test_sample_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"data.{name}: expected >= 1"):
        DataConfig(**{name: 0})
