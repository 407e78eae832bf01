"""Manifest scan at dataset scale: VFHQ's ~16,000 meta files and CelebV-HQ's 35,666-clip info file.

Generates look-alike metadata only (no frames, no videos: every clip then fails at the frames / video
check, after its metadata was read and checked), times our readers against a plain directory listing
(and a listing plus reading every byte) of the same files in the same run, then times the manifest
(buckets, splits, segments) over as many clip records. Target: each scan under 60 s on 2 CPUs.

    python benchmarks/manifest_scan.py [--vfhq-clips 16000] [--celebvhq-clips 35666] [--dir /tmp/x]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import BuildConfig, CelebvhqConfig, VfhqConfig  # noqa: E402
from pipeline.manifest import build_manifest  # noqa: E402
from pipeline.sources.base import ClipRecord, ScanResult  # noqa: E402
from pipeline.sources.celebvhq import scan_celebvhq  # noqa: E402
from pipeline.sources.vfhq import scan_vfhq  # noqa: E402


def write_vfhq_meta(root: Path, clips: int, rng: np.random.Generator) -> int:
    """meta_info/VFHQ-Train|Test/Clip+...txt with 50-400 frame rows each; returns the rows written."""
    rows_total = 0
    for c in range(clips):
        folder = root / "meta_info" / ("VFHQ-Test" if c % 16 == 0 else "VFHQ-Train")
        folder.mkdir(parents=True, exist_ok=True)
        start, length = int(rng.integers(0, 5000)), int(rng.integers(50, 401))
        name = f"Clip+{'_-' if c % 7 == 0 else ''}yt{c // 4:05d}-x_{c % 3}+P{c % 2}+C{c}+F{start}-{start + length}"
        x, y = rng.uniform(200, 1400), rng.uniform(100, 600)
        lines = ["Video: x", "H: 1080", "W: 1920", "FPS: 25", "", "FRAME INDEX PID BBOX LANDMARKS", ""]
        for index in range(start, start + length):
            box = f"{x:.3f} {y:.3f} 300.000 360.000"
            marks = " ".join(
                f"{x + dx:.3f} {y + dy:.3f}"
                for dx, dy in ((90, 120), (210, 120), (150, 190), (100, 260), (200, 260))
            )
            lines.append(f"{index} {c % 2} {box} {marks}")
        lines.append(f"CROP: {int(x) - 150} {int(y) - 150} {int(x) + 450} {int(y) + 510}")
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
        rows_total += length
    return rows_total


def write_celebvhq_info(root: Path, clips: int, rng: np.random.Generator) -> int:
    entries = {}
    for c in range(clips):
        ytb_id = f"{'-' if c % 5 == 0 else ''}v{c // 2:05d}_a-{c % 9}"
        start = float(rng.uniform(0, 600))
        entries[f"{ytb_id}_{c % 2}"] = {
            "ytb_id": ytb_id,
            "duration": {"start_sec": start, "end_sec": start + float(rng.uniform(-1, 20))},
            "bbox": {"top": 0.1, "bottom": 0.6, "left": 0.3, "right": 0.7},
            "attributes": {
                "appearance": [int(v) for v in rng.integers(0, 2, 40)],
                "action": [int(v) for v in rng.integers(0, 2, 35)],
                "emotion": {"sep_flag": False, "labels": "happy"},
            },
            "version": "v0.1",
        }
    info = {
        "meta_info": {
            "appearance_mapping": [f"a{i}" for i in range(40)],
            "action_mapping": [f"b{i}" for i in range(35)],
        },
        "clips": entries,
    }
    (root / "celebvhq_info.json").write_text(json.dumps(info))
    (root / "raw").mkdir(exist_ok=True)
    return (root / "celebvhq_info.json").stat().st_size


def plain_listing(root: Path, read: bool) -> tuple[float, int]:
    started, count = time.perf_counter(), 0
    for folder, _, files in os.walk(root):
        for name in files:
            count += 1
            if read:
                Path(folder, name).read_bytes()
    return time.perf_counter() - started, count


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def synthetic_records(vfhq: int, celebvhq: int) -> ScanResult:
    records = [
        ClipRecord(f"Clip+yt{c // 4}+P0+C{c}+F0-200", "vfhq", f"yt{c // 4}+P0", "s", "frames", 25.0, 200, 600, 660,
                   face_boxes=[[150.0, 150.0, 450.0, 510.0]] * 200, split_hint="test" if c % 16 == 0 else "train")
        for c in range(vfhq)
    ]  # fmt: skip
    records += [
        ClipRecord(f"v{c // 2}_{c % 2}", "celebvhq", f"v{c // 2}", "s", "video", 25.0, 250, 1920, 1080,
                   frame_offset=100, crop_box=[700, 200, 1200, 700], labels={"emotion": ["happy"]})
        for c in range(celebvhq)
    ]  # fmt: skip
    return ScanResult(records, [])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vfhq-clips", type=int, default=16000)
    parser.add_argument("--celebvhq-clips", type=int, default=35666)
    parser.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="manifest-scan-"))
    rng = np.random.default_rng(0)
    try:
        vfhq_root, celeb_root = work / "vfhq", work / "celebvhq"
        vfhq_root.mkdir(parents=True, exist_ok=True)
        celeb_root.mkdir(parents=True, exist_ok=True)
        gen_seconds, rows = timed(lambda: write_vfhq_meta(vfhq_root, args.vfhq_clips, rng))
        info_bytes = write_celebvhq_info(celeb_root, args.celebvhq_clips, rng)
        list_s, files = plain_listing(vfhq_root, read=False)
        read_s, _ = plain_listing(vfhq_root, read=True)
        vfhq_s, vfhq = timed(lambda: scan_vfhq(vfhq_root, VfhqConfig()))
        celeb_s, celeb = timed(lambda: scan_celebvhq(celeb_root, CelebvhqConfig()))
        celeb_list_s, _ = plain_listing(celeb_root, read=True)
        records = synthetic_records(args.vfhq_clips, args.celebvhq_clips)
        manifest_s, (manifest, _) = timed(lambda: build_manifest(records, BuildConfig()))
        vfhq_reasons: dict[str, int] = {}
        for failure in vfhq.failures:
            vfhq_reasons[failure.error] = vfhq_reasons.get(failure.error, 0) + 1
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "vfhq": {
                "meta_files": files, "frame_rows": rows, "generate_s": round(gen_seconds, 2),
                "plain_listing_s": round(list_s, 3), "listing_and_read_s": round(read_s, 3),
                "scan_s": round(vfhq_s, 2), "scan_over_read": round(vfhq_s / max(read_s, 1e-9), 1),
                "clips_checked": len(vfhq.failures) + len(vfhq.records), "failures_by_reason": vfhq_reasons,
            },
            "celebvhq": {
                "clips": args.celebvhq_clips, "info_bytes": info_bytes, "listing_and_read_s": round(celeb_list_s, 3),
                "scan_s": round(celeb_s, 2), "clips_checked": len(celeb.failures) + len(celeb.records),
            },
            "manifest": {"clips": len(records.records), "segments": len(manifest), "seconds": round(manifest_s, 2)},
            "target_s": 60,
        }  # fmt: skip
        print(json.dumps(result, indent=1))
        return result
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
