"""Capacity projection: time and GPU-hours to build VFHQ + CelebV-HQ from per-stage throughputs measured
on the machine at hand, the bottleneck stage, and the GPU shares that balance the stages. JSON on stdout.

    python benchmarks/projection.py [--gpus 8 16 64] [--frames 10e6]          # measures, then projects
    python benchmarks/projection.py --stages-json stages.json                  # from benchmarks/stages.py

Model. Every dataset frame is decoded, cropped, encoded (CPU tasks) and goes through face_mask,
foreground and gaze; swap runs on the swap bucket (40 % of frames), stylise on the style bucket (10 %).
A stage's device-seconds per dataset frame is w = bucket share / frames-per-s on one device. With the
GPUs split in proportion to w (balanced), every stage finishes together: time = frames x sum(w) / N and
GPU-hours = frames x sum(w) / 3600, whatever N. With a fixed split (configs/data/cluster-8gpu.yaml's
num_gpus x pool_size), the slowest stage sets the time: max over stages of frames x w / its GPUs.
Assumes throughput linear in GPU share and no stage starved by the CPU side (checked: the decode +
encode cores needed to keep pace are reported).

On a CPU-only machine "one device" is one process on this machine's cores with the tiny profile: the
figures show the method and this machine's balance, not a GPU cluster's; rerun with --weights-dir on a
GPU node for those. The foreground stage's parsing backend runs the face-mask network (see
stage_face_mask.py), so it is given face_mask's throughput; DensePose (the cluster default) cannot run
here and is flagged as not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.sources.demo import make_identity, render_clip  # noqa: E402
from pipeline.video import EncodeSettings, crop_and_resize, encode_mp4  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "configs" / "data" / "cluster-8gpu.yaml"
# Share of dataset frames each annotator sees (swap and style buckets: configs/data/defaults.yaml mix).
BUCKET_SHARE = {"face_mask": 1.0, "foreground": 1.0, "gaze": 1.0, "swap": 0.4, "stylise": 0.1}
FPS_KEYS = (  # each stage script names its batched figure its own way; per dataset frame first
    "clip_frames_per_s_at_every_10",
    "frames_per_s_batched",
    "batched_frames_per_s",
    "batched_fps",
)


def stage_fps(results: list[dict]) -> dict[str, float]:
    """Frames/s per dataset frame of each stage from benchmarks/stages.py's results."""
    fps = {}
    for result in results:
        key = next((k for k in FPS_KEYS if k in result), None)
        if key is None:
            raise ValueError(f"stage {result['stage']}: no throughput among {FPS_KEYS} in {sorted(result)}")
        fps[result["stage"]] = float(result[key])
    return fps


def cpu_seconds_per_frame(frames: int, resolution: int) -> dict[str, float]:
    """Single-threaded seconds per frame of the CPU tasks: crop + resize (the decode's per-frame work on
    rendered frames) and libx264 encode at the build's settings."""
    import cv2

    cv2.setNumThreads(1)
    raw, _, _ = render_clip(
        make_identity(1), frames, (2 * resolution, 2 * resolution), resolution * 0.9, 0.5, 0
    )
    started = time.perf_counter()
    cropped = crop_and_resize(raw, (0, 0, 2 * resolution, 2 * resolution), resolution)
    crop_s = time.perf_counter() - started
    started = time.perf_counter()
    encode_mp4(cropped, 25.0, EncodeSettings(threads=1))
    encode_s = time.perf_counter() - started
    return {"decode_crop": crop_s / frames, "encode": encode_s / frames}


def current_split(path: Path) -> dict[str, float]:
    """GPUs per stage in a build config: num_gpus x pool_size."""
    stages = yaml.safe_load(path.read_text())["stages"]
    return {s["name"]: float(s.get("num_gpus", 0)) * int(s.get("pool_size", 1)) for s in stages}


def project(fps: dict[str, float], cpu_s: dict[str, float], frames: float, gpus: list[int]) -> dict:
    weights = {name: share / fps[name] for name, share in BUCKET_SHARE.items() if name in fps}
    total = sum(weights.values())
    bottleneck = max(weights, key=weights.get)
    cpu_per_frame = sum(cpu_s.values())
    split = current_split(CLUSTER_YAML)
    per_n = []
    for n in gpus:
        seconds = frames * total / n
        fixed = {name: frames * w / (split[name] * n / 8) for name, w in weights.items() if split.get(name)}
        slowest = max(fixed, key=fixed.get)
        per_n.append(
            {
                "gpus": n,
                "balanced_hours": round(seconds / 3600, 2),
                "gpu_hours": round(frames * total / 3600, 1),
                "balanced_num_gpus": {k: round(w / total * n, 3) for k, w in weights.items()},
                "cpu_cores_to_keep_pace": round(frames * cpu_per_frame / seconds, 1),
                "cluster_yaml_split_scaled_hours": round(fixed[slowest] / 3600, 2),
                "cluster_yaml_bottleneck": slowest,
            }
        )
    return {
        "frames": frames,
        "bucket_share": BUCKET_SHARE,
        "stage_frames_per_s": {k: round(v, 3) for k, v in fps.items()},
        "device_seconds_per_dataset_frame": {k: round(w, 5) for k, w in weights.items()},
        "gpu_share_balanced": {k: round(w / total, 3) for k, w in weights.items()},
        "bottleneck": bottleneck,
        "cpu_seconds_per_frame": {k: round(v, 5) for k, v in cpu_s.items()},
        "cluster_yaml_gpus_per_stage": split,
        "projection": per_n,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages-json", help="benchmarks/stages.py output (default: measure now)")
    parser.add_argument("--weights-dir", help="real weights for the measurement (default: tiny)")
    parser.add_argument("--frames", type=float, default=10e6, help="dataset frames (VFHQ + CelebV-HQ ~10 M)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--bench-frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    if args.stages_json:
        report = json.loads(Path(args.stages_json).read_text())
    else:
        import stages

        options = ["--frames", str(args.bench_frames), "--resolution", str(args.resolution)]
        with contextlib.redirect_stdout(sys.stderr):  # stdout is this script's one JSON document
            results = stages.main(options + (["--weights-dir", args.weights_dir] if args.weights_dir else []))
        report = {"profile": "full" if args.weights_dir else "tiny", "results": results}
    fps = stage_fps(report["results"])
    notes = []
    if "foreground" not in fps and "face_mask" in fps:
        fps["foreground"] = fps["face_mask"]
        notes.append("foreground: parsing backend, given face_mask's throughput; DensePose not measured")
    cpu_s = cpu_seconds_per_frame(args.bench_frames * 2, args.resolution)
    result = {
        "benchmark": "projection",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "profile": report.get("profile", "tiny"),
        "device": "one process on this machine (CPU) per 'GPU'"
        if "cuda" not in json.dumps(report)
        else "GPU",
        "notes": notes,
        **project(fps, cpu_s, args.frames, args.gpus),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
