"""Per-stage throughput: frames/s with frames batched against the same stage one frame at a time,
measured in the same run on the same clip, for every annotator. JSON on stdout.

    python benchmarks/stages.py [--weights-dir DIR] [--frames 24] [--resolution 256] [--only gaze swap]

Without --weights-dir the tiny profile is used (random weights in the real formats, CPU-sized demo
options); with real weights and a GPU the same script gives the figures for benchmarks/RESULTS.md.
Each stage's own script (benchmarks/stage_<name>.py) holds its `bench` function and its details.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.sources.demo import make_identity, render_clip  # noqa: E402
from pipeline.stages import load_all_stages  # noqa: E402
from pipeline.weights import ensure_tiny_weights  # noqa: E402

# stage name -> (benchmark module, extra keyword arguments of its bench function)
BENCHES = {
    "face_mask": ("stage_face_mask", {}),
    "gaze": ("stage_gaze", {}),
    "swap": ("stage_face_swap", {"with_boxes": True}),
    "stylise": ("stage_stylise", {}),
}
# Stage options the bench functions use by default, for the weights they need (face_mask: bisenet).
BENCH_OPTIONS = {"face_mask": {"model": "bisenet"}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights-dir", help="real weights (default: tiny weights in a temp folder)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these stages")
    args = parser.parse_args(argv)

    weights_dir = Path(args.weights_dir or tempfile.mkdtemp(prefix="bench_weights_"))
    if not args.weights_dir:
        stages = load_all_stages()
        needed = [n for name in BENCHES for n in stages[name].weights_needed(BENCH_OPTIONS.get(name, {}))]
        ensure_tiny_weights(weights_dir, needed)
    size = args.resolution
    frames, boxes, _ = render_clip(make_identity(0), args.frames, (size, size), size * 0.47, 0.5, seed=0)
    results = []
    for name in args.only or sorted(BENCHES):
        module_name, extra = BENCHES[name]
        module = importlib.import_module(module_name)
        kwargs = {"face_boxes": boxes} if extra.get("with_boxes") else {}
        started = time.perf_counter()
        result = module.bench(weights_dir, frames, **kwargs)
        results.append({"stage": name, "seconds": round(time.perf_counter() - started, 1), **result})
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    report = {"benchmark": "stages", "machine": machine, "profile": "full" if args.weights_dir else "tiny"}
    print(json.dumps({**report, "results": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
