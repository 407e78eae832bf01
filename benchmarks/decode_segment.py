"""One decode task at real resolution: peak RSS and seconds for a 240-frame 1080p segment at the start
and at minute 5 of a long source (a raw CelebV-HQ video), today's way vs the fixed one, same run.

today: decode from frame 0, keep the segment's frames at source resolution, stack, then crop + resize
       (the earlier code: `read_video_frames` then `crop_and_resize`).
fixed: seek to the keyframe before the segment, crop + resize each frame as it is decoded
       (`pipeline.segment.decode_segment`).
Each measurement runs in its own process, so its peak RSS is its own.

    python benchmarks/decode_segment.py [--minutes 5.5] [--frames 240] [--resolution 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.segment import decode_segment  # noqa: E402
from pipeline.video import crop_and_resize  # noqa: E402

FPS, WIDTH, HEIGHT = 25, 1920, 1080
BOX = [660, 140, 1460, 940]  # an 800-px face square, as the official CelebV-HQ crop gives


def write_source(path: Path, seconds: float) -> None:
    """A 1080p H.264 source (GOP 250, as YouTube-like encodes) with moving content."""
    base = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :, None].repeat(HEIGHT, 0).repeat(3, 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28", "g": "250"}
        for t in range(int(seconds * FPS)):
            frame = np.roll(base, 7 * t, axis=1).astype(np.uint8)
            frame[t % HEIGHT, :, :] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def today(source: str, start: int, stop: int, resolution: int) -> np.ndarray:
    frames = []
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(container.decode(stream)):
            if index >= stop:
                break
            if index >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
    return crop_and_resize(np.stack(frames), BOX, resolution)


def fixed(source: str, start: int, stop: int, resolution: int) -> np.ndarray:
    row = {"source": source, "source_kind": "video", "frame_start": start, "frame_stop": stop, "width": WIDTH,
           "height": HEIGHT, "face_boxes": "", "fixed_crop": json.dumps(BOX), "member_prefix": ""}  # fmt: skip
    return decode_segment(row, resolution, 1.8, threads=1)["frames"]


def child(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    frames = (today if args.way == "today" else fixed)(
        args.source, args.start, args.start + args.frames, args.resolution
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(
        json.dumps(
            {"seconds": round(seconds, 2), "peak_rss_mib": round(peak), "checksum": int(frames[::17].sum())}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.5)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.mp4"
        started = time.perf_counter()
        write_source(source, args.minutes * 60)
        results: dict = {"source": f"{WIDTH}x{HEIGHT} H.264, {args.minutes} min at {FPS} fps, GOP 250",
                         "generate_s": round(time.perf_counter() - started, 1), "segment_frames": args.frames}  # fmt: skip
        later = int(min(5 * 60, args.minutes * 60 - args.frames / FPS - 1) * FPS)
        for label, start in (("at_start", 0), ("at_minute_5", later)):
            for way in ("today", "fixed"):
                command = [sys.executable, __file__, "--child", "--way", way, "--source", str(source),
                           "--start", str(start), "--frames", str(args.frames), "--resolution", str(args.resolution)]  # fmt: skip
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results[f"{label}_{way}"] = json.loads(out.strip().splitlines()[-1])
            same = results[f"{label}_today"]["checksum"] == results[f"{label}_fixed"]["checksum"]
            results[f"{label}_same_pixels"] = same
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
