"""Frames per second of the shard builder's CPU path against a floor measured in the same run.

Floor: the same clips decoded (PyAV for mp4, OpenCV for PNG frames), cropped, resized and encoded with
PyAV's libx264, no Ray, in N single-threaded worker processes (N = --num-cpus, one segment each at a
time): the best a scheduler can do with this work on N cores, so pipeline / floor is Ray's overhead.
The old baseline (one process, decoder and encoder free to use every core) is kept as
`single_process_fps` for reference; the pipeline beat it, so it measured nothing. Pipeline:
a full `run_build` (scan, manifest, Ray Data DAG, shard writing, index) on a Ray instance started
beforehand. It runs twice into fresh outputs: "cold" includes starting Ray's worker processes and
their imports (a fixed few seconds), "warm" is the steady state a long build sees; the ratio uses warm.
Target: pipeline / floor >= 0.7 with 2 CPUs.

    python benchmarks/shard_build.py [--clips 24] [--resolution 256] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.build import run_build  # noqa: E402
from pipeline.config import load_build_config  # noqa: E402
from pipeline.manifest import build_manifest  # noqa: E402
from pipeline.segment import decode_segment  # noqa: E402
from pipeline.sources import scan_source  # noqa: E402
from pipeline.video import EncodeSettings, encode_mp4  # noqa: E402


def _decode_encode(row: dict, resolution: int, crop_scale: float, settings: EncodeSettings) -> int:
    """One segment as a pipeline task handles it, single-threaded: decode + crop + resize, encode."""
    row = decode_segment(row, resolution, crop_scale, threads=1)
    encode_mp4(row["frames"], row["fps"], settings)
    return int(row["num_frames"])


def floor_fps(config, processes: int) -> tuple[float, int]:
    """Decode + crop + resize + encode every planned segment in `processes` single-threaded processes."""
    manifest, _ = build_manifest(scan_source(config), config)
    video = config.video
    settings = EncodeSettings(crf=video.crf, preset=video.preset, gop=video.gop, threads=1)
    work = functools.partial(
        _decode_encode, resolution=config.resolution, crop_scale=config.crop_scale, settings=settings
    )
    rows = manifest.to_dict("records")
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(work, rows[:processes]))  # warm-up: the workers' imports stay out of the timing
        started = time.perf_counter()
        frames_total = sum(pool.map(work, rows))
    return frames_total / (time.perf_counter() - started), frames_total


def single_process_fps(config) -> float:
    """The old baseline: one process, decoder and encoder threads free to use every core."""
    manifest, _ = build_manifest(scan_source(config), config)
    settings = EncodeSettings(
        crf=config.video.crf, preset=config.video.preset, gop=config.video.gop, threads=0
    )
    frames_total = 0
    started = time.perf_counter()
    for row in manifest.to_dict("records"):
        row = decode_segment(row, config.resolution, config.crop_scale)
        encode_mp4(row["frames"], row["fps"], settings)
        frames_total += row["num_frames"]
    return frames_total / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=24, help="clips per format (VFHQ and CelebV-HQ)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        overrides = [
            f"demo.vfhq_clips={args.clips}", f"demo.celebvhq_clips={args.clips}", "demo.min_frames=60",
            "demo.max_frames=90", f"resolution={args.resolution}", "max_frames=96", "samples_per_shard=4",
            f"num_cpus={args.num_cpus}", "stages=[]",
        ]  # fmt: skip
        root = str(work / "demo")
        config = load_build_config("demo", overrides=overrides, root=root, out=str(work / "cold"))
        warm_config = load_build_config("demo", overrides=overrides, root=root, out=str(work / "warm"))
        scan_source(config)  # generate the dataset outside the timings
        floor_before, frames = floor_fps(config, args.num_cpus)
        single = single_process_fps(config)

        import ray

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cold = run_build(config, progress=False)
        summary = run_build(warm_config, progress=False)
        ray.shutdown()
        # The floor again after the pipeline: a spread between the two shows the machine's load changed.
        floor_after, _ = floor_fps(config, args.num_cpus)
        floor = (floor_before + floor_after) / 2
        pipeline = frames / summary.seconds
        result = {
            "benchmark": "shard_build",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "num_cpus": args.num_cpus,
            "resolution": args.resolution,
            "segments": summary.segments,
            "frames": frames,
            "floor_fps": round(floor, 1),
            "floor": f"{args.num_cpus} single-threaded processes, no Ray",
            "floor_fps_before_after": [round(floor_before, 1), round(floor_after, 1)],
            "single_process_fps": round(single, 1),
            "pipeline_fps": round(pipeline, 1),
            "pipeline_seconds": round(summary.seconds, 2),
            "pipeline_fps_cold": round(frames / cold.seconds, 1),
            "pipeline_seconds_cold": round(cold.seconds, 2),
            "ratio": round(pipeline / floor, 3),
            "target_ratio": 0.7,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
