"""Samples/s of one DataLoader worker: sparse decode (the loader) against full-clip decode, JSON out.

    python benchmarks/loader.py                       # 512², 240-frame clips, 16 frames at stride 2
    python benchmarks/loader.py --clips 2 --samples 8 # quicker

Writes a few shards with the project's writer and encoder (H.264, GOP 16): talking heads from the demo
generator at 512², real + swap buckets (the swap video is another identity with the same motion), face
and foreground masks. Then, in one process with one thread (one DataLoader worker = one core):

- loader: `make_loader(num_workers=0)` end to end (tar read, shuffle, decode, augment, collate);
- sparse: `decode_sample` on samples already read from the tars (decode + augment only);
- full: the authors' approach on the same samples: decode the whole real and driving videos and all
  mask frames, then take the same frames through the same augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.preprocess import to_model_pixels  # noqa: E402
from pipeline import contract  # noqa: E402
from pipeline.sources.demo import make_identity, render_clip  # noqa: E402
from pipeline.video import EncodeSettings, read_video_frames  # noqa: E402
from pipeline.writer import encode_members, write_shard  # noqa: E402
from train.augment import draw_jitter, prepare_driving_frames, resize_frames, resize_masks  # noqa: E402
from train.data import DataConfig, decode_sample, list_shards, make_loader  # noqa: E402


def _masks(boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Face (ellipse in the face box) and foreground (face box grown downwards) masks per frame."""
    face = np.zeros((len(boxes), size, size), np.uint8)
    fg = np.zeros_like(face)
    for t, (x0, y0, x1, y1) in enumerate(boxes):
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        axes = (int((x1 - x0) / 2), int((y1 - y0) / 2 * 1.2))
        cv2.ellipse(face[t], centre, axes, 0, 0, 360, 1, -1)
        cv2.rectangle(
            fg[t],
            (int(x0 - 0.3 * (x1 - x0)), int(y0 - 0.3 * (y1 - y0))),
            (int(x1 + 0.3 * (x1 - x0)), size),
            1,
            -1,
        )
    return face.astype(bool), fg.astype(bool)


def write_bench_shards(folder: Path, clips: int, frames: int, size: int) -> float:
    """`clips` samples (alternately real and swap) in two committed shards; returns seconds spent."""
    started = time.perf_counter()
    rows = []
    for i in range(clips):
        bucket = "real" if i % 2 == 0 else "swap"
        real, boxes, _ = render_clip(make_identity(i), frames, (size, size), size * 0.45, 1.0, seed=i)
        face, fg = _masks(boxes, size)
        row = {
            "key": f"bench__clip{i:02d}__s000", "clip_id": f"clip{i:02d}", "dataset": "bench",
            "identity": f"id{i}", "source": "render_clip", "fps": 25.0, "num_frames": frames, "segment": 0,
            "frame_start": 0, "frame_stop": frames, "crop_box": json.dumps([0, 0, size, size]), "bucket": bucket,
            "annotations": json.dumps(["face_mask", "foreground"] + (["swap"] if bucket == "swap" else [])),
            "timings": "{}", "error_stage": "", "error": "", "message": "", "frames": real, "face_mask": face,
            "fg_mask": fg,
        }  # fmt: skip
        if bucket == "swap":  # another identity, the same head motion
            row["driving_frames"] = render_clip(
                make_identity(i + 100), frames, (size, size), size * 0.45, 1.0, seed=i
            )[0]
        rows.append(encode_members(row, size, EncodeSettings(gop=16)))
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        write_shard(rows[part::2], folder)
    return time.perf_counter() - started


def decode_sample_full(raw: dict, config: DataConfig, rng: random.Random) -> dict:
    """The baseline: whole videos and masks decoded, then the same frame choice and augmentation."""
    meta = contract.SampleMeta.from_json_bytes(raw[contract.META])
    real = read_video_frames(raw[contract.REAL], threads=1)
    member = contract.VIDEO_MEMBER_OF_BUCKET[meta.bucket]
    driving_all = real if member == contract.REAL else read_video_frames(raw[member], threads=1)
    face, fg = contract.decode_mask(raw[contract.FACE_MASK]), contract.decode_mask(raw[contract.FG_MASK])
    start = rng.randint(0, len(real) - config.span)
    indices = [start + config.stride * k for k in range(config.num_frames)]
    reference_index = rng.randrange(len(real))
    jitter = draw_jitter(rng, config.scale_jitter, config.aspect_jitter)
    size = config.resolution
    return {
        "reference": to_model_pixels(resize_frames(real[[reference_index]], size))[0],
        "driving": to_model_pixels(prepare_driving_frames(driving_all[indices], face[indices], size, jitter)),
        "background_mask": torch.from_numpy(~resize_masks(fg[[reference_index]], size)).float(),
        "target": to_model_pixels(resize_frames(real[indices], size)),
    }


class Timer:
    """Wall and CPU seconds of a block: on a shared machine, samples per CPU-second is what one worker
    with a core to itself would reach."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, count: int) -> tuple[float, float]:
        return round(count / self.wall, 2), round(count / self.cpu, 2)


def _rates(decode, raws: list[dict], config: DataConfig, count: int) -> tuple[float, float]:
    rng = random.Random(0)
    decode(raws[0], config, rng)  # warm-up
    with Timer() as timer:
        for i in range(count):
            decode(raws[i % len(raws)], config, rng)
    return timer.rates(count)


def bench(clips: int, frames: int, size: int, num_frames: int, stride: int, samples: int) -> dict:
    cv2.setNumThreads(1)  # one DataLoader worker = one core
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        write_seconds = write_bench_shards(folder, clips, frames, size)
        config = DataConfig(
            shards=str(folder), num_frames=num_frames, stride=stride, resolution=size, batch_size=1,
            num_workers=0, shuffle_buffer=4, steps_per_epoch=samples + 1,
        )  # fmt: skip
        shard_bytes = sum(p.stat().st_size for p in folder.glob("*.tar"))
        raws = [s for url in list_shards(config) for s in wds.WebDataset(url, shardshuffle=False)]
        load_before = os.getloadavg()[0]
        loader = iter(make_loader(config, seed=0, epoch=0, rank=0, world_size=1))
        next(loader)  # the first batch also fills the shuffle buffer
        with Timer() as timer:
            count = sum(1 for _ in loader)
        loader_rate = timer.rates(count)
        sparse_rate = _rates(decode_sample, raws, config, samples)
        full_rate = _rates(decode_sample_full, raws, config, samples)
    return {
        "clips": clips,
        "frames_per_clip": frames,
        "resolution": size,
        "num_frames": num_frames,
        "stride": stride,
        "samples_timed": samples,
        "shard_mib": round(shard_bytes / 2**20, 1),
        "shard_write_s": round(write_seconds, 1),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        # (per wall second, per CPU second)
        "loader_samples_per_s": loader_rate,
        "sparse_decode_samples_per_s": sparse_rate,
        "full_decode_samples_per_s": full_rate,
        "speedup_sparse_vs_full_cpu": round(sparse_rate[1] / full_rate[1], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=240, help="frames per clip")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--samples", type=int, default=24, help="samples timed per method")
    args = parser.parse_args(argv)
    result = bench(args.clips, args.frames, args.resolution, args.num_frames, args.stride, args.samples)
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    print(json.dumps({"machine": machine, "results": [result]}, indent=2))


if __name__ == "__main__":
    main()
