"""Peak memory of a whole shard build (the CLI and every Ray process it starts) on a download full of damaged
files, against a clean download of only its good clips, same run.

The corpora are the hostile VFHQ / CelebV-HQ look-alikes of the tests (tests/hostile_corpus.py: bombs that
declare 13400² and 30000² frames, a 2 GiB zip member, a 512 MiB meta file, boxes far outside the frame, ...).
The process tree is polled every 0.2 s: summed RSS (a page shared by several processes counts in each, so
it over-counts) and summed PSS (shared pages divided among the processes that map them: the real footprint).

    python benchmarks/build_memory.py [--dataset vfhq celebvhq]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hostile_corpus import build_celebvhq, build_vfhq  # noqa: E402
from process_tree import tree_memory  # noqa: E402

OVERRIDES = [
    "resolution=64",
    "min_frames=8",
    "max_frames=12",
    "samples_per_shard=4",
    "max_failure_fraction=0.9",
]
OVERRIDES += ["stages=[]", "num_cpus=2"]
BUILDERS = {"vfhq": build_vfhq, "celebvhq": build_celebvhq}


def measure_build(dataset: str, root: Path, out: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "pipeline", "build", "--no-progress", "--dataset", dataset]
    command += ["--root", str(root), "--out", str(out), *OVERRIDES]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handle, peak_rss, peak_pss = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        rss, pss, _ = tree_memory(handle)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    return {
        "exit_code": process.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(peak_rss / 1e9, 3),
        "peak_pss_gb": round(peak_pss / 1e9, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", choices=sorted(BUILDERS), default=sorted(BUILDERS))
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="build-memory-") as tmp:
        for dataset in args.dataset:
            runs = {}
            for kind, hostile in (("clean", False), ("hostile", True)):
                root = Path(tmp) / dataset / kind
                BUILDERS[dataset](root / "root", hostile=hostile)
                runs[kind] = measure_build(dataset, root / "root", root / "out")
            runs["hostile_over_clean_rss"] = round(
                runs["hostile"]["peak_rss_gb"] / runs["clean"]["peak_rss_gb"], 3
            )
            results[dataset] = runs
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
