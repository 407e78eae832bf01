"""Object-store traffic of the shard builder: the plan before chaining (one actor pool of one actor per
annotator, every row through every pool: `chain_stages=none`, as the demo config had it) against
chaining (every annotator in one actor: `chain_stages=all`) with one actor and with the demo config's
pool (two actors), in the same run on the same demo data, with the same outputs.

Bytes: Ray Data's per-operator stats (`Dataset.get_stats_summary()`): for each physical operator the sum
of `output_size_bytes`, the size of the blocks it put into the object store (operators Ray fused into one
task count once, as they store once). Summed over the operators and divided by the samples built: the
bytes each sample put into the object store on its way from the manifest to the writer's status row.
Seconds: end to end `run_build` (manifest, identity bank, Ray Data plan, shards, index) on a Ray
instance started beforehand. Outputs: every shard tar compared byte for byte (sha256), and every tar
member keyed by sample key and member name, so a difference in shard membership would still show.

    python benchmarks/object_store.py [--clips 3] [--resolution 512] [--num-cpus 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline.dag  # noqa: E402
from pipeline.build import run_build  # noqa: E402
from pipeline.config import load_build_config  # noqa: E402
from pipeline.sources import scan_source  # noqa: E402

BEFORE = "before (chain_stages=none, 5 pools x 1 actor)"
PLANS = {  # plan name -> (chain_stages, the stages' pool_size and num_cpus; None = the demo config's)
    BEFORE: ("none", (1, 0.2)),
    "chained, 1 actor (pool_size=1)": ("all", (1, 0.2)),
    "fixed (demo config: chained, pool_size=2)": ("all", None),
}


def plan_overrides(plan: str) -> list[str]:
    """The overrides that give `plan`: chain_stages, and every demo stage's pool size and CPUs."""
    chain, pools = PLANS[plan]
    if pools is None:
        return [f"chain_stages={chain}"]
    size, cpus = pools
    stages = [
        {
            "name": s.name,
            "num_cpus": cpus,
            "pool_size": size,
            "batch_size": s.batch_size,
            "options": s.options,
        }
        for s in load_build_config("demo").stages
    ]
    return [f"chain_stages={chain}", f"stages={json.dumps(stages)}"]


def traffic(dataset: Any) -> dict[str, int]:
    """Bytes each physical operator wrote into the object store, by operator name."""
    summary = dataset.get_stats_summary()
    out: dict[str, int] = {}
    pending = [summary]
    while pending:  # a union or a zip keeps its inputs' stats in parents
        node = pending.pop()
        for op in node.operators_stats:
            if op.output_size_bytes is not None:
                out[op.operator_name] = out.get(op.operator_name, 0) + int(op.output_size_bytes.sum)
        pending.extend(node.parents)
    return out


def run_plan(overrides: list[str], root: Path, out: Path) -> dict[str, Any]:
    """One full build; returns seconds, samples and the object-store bytes of its Ray Data plan."""
    captured: list[Any] = []
    original = pipeline.dag.build_dataset

    def capture(*args: Any, **kwargs: Any) -> Any:
        dataset = original(*args, **kwargs)
        captured.append(dataset)
        return dataset

    pipeline.dag.build_dataset = capture  # build.py imports it from the module at call time
    try:
        config = load_build_config("demo", overrides=overrides, root=str(root), out=str(out))
        started = time.perf_counter()
        summary = run_build(config, progress=False)
        seconds = time.perf_counter() - started
    finally:
        pipeline.dag.build_dataset = original
    (dataset,) = captured
    per_operator = traffic(dataset)
    total = sum(per_operator.values())
    samples = summary.segments - summary.skipped  # the segments the plan carried, failed ones too
    return {
        "seconds": round(seconds, 2),
        "samples_written": summary.written,
        "samples_planned": samples,
        "failed_clips": summary.failed_clips,
        "object_store_bytes": total,
        "object_store_mib_per_sample": round(total / max(1, samples) / 2**20, 2),
        "per_operator_mib": {name: round(b / 2**20, 2) for name, b in per_operator.items()},
    }


def tar_digests(out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 of each shard tar by name, and of each member by `<sample key>.<member>`."""
    shards, members = {}, {}
    for path in sorted((out / "shards").glob("*.tar")):
        shards[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                data = tar.extractfile(info)
                members[info.name] = hashlib.sha256(data.read() if data else b"").hexdigest()
    return shards, members


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=3, help="demo clips per format (VFHQ and CelebV-HQ)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each plan, alternating")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_object_store_"))
    try:
        base = [
            f"demo.vfhq_clips={args.clips}", f"demo.celebvhq_clips={args.clips}",
            f"resolution={args.resolution}", f"num_cpus={args.num_cpus}",
        ]  # fmt: skip
        root = work / "demo"
        scan_source(load_build_config("demo", overrides=base, root=str(root), out=str(work / "x")))

        import ray

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")  # fmt: skip
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PLANS}
        digests: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        # The chained plans first: the baseline then runs on warm task workers, which can only favour it.
        order = [name for _ in range(args.repeats) for name in reversed(PLANS)]
        for i, name in enumerate(order):
            out = work / f"out{i}"
            runs[name].append(run_plan([*base, *plan_overrides(name)], root, out))
            digests.setdefault(name, tar_digests(out))
            shutil.rmtree(out)
        ray.shutdown()
        before_shards, before_members = digests[BEFORE]
        before_bytes = runs[BEFORE][0]["object_store_bytes"]
        plans = {}
        for name, plan_runs in runs.items():
            shards, members = digests[name]
            plans[name] = {
                "mib_per_sample": plan_runs[0]["object_store_mib_per_sample"],
                "bytes_ratio_over_before": round(
                    plan_runs[0]["object_store_bytes"] / max(1, before_bytes), 3
                ),
                "seconds": [r["seconds"] for r in plan_runs],
                "best_seconds_ratio_over_before": round(
                    min(r["seconds"] for r in plan_runs) / min(r["seconds"] for r in runs[BEFORE]), 3
                ),
                "shards": len(shards),
                "tars_byte_identical_to_before": shards == before_shards,
                # A shard's name hashes its keys: a shared name is a shard of the same samples.
                "shards_same_samples_byte_identical": sum(
                    before_shards[n] == shards[n] for n in before_shards.keys() & shards.keys()
                ),
                "members": len(members),
                "members_differing_from_before": sorted(
                    k
                    for k in before_members.keys() | members.keys()
                    if before_members.get(k) != members.get(k)
                ),
            }
        result = {
            "benchmark": "object_store",
            "machine": f"{platform.machine()}, {args.num_cpus} Ray CPUs",
            "dataset": f"demo, {args.clips}+{args.clips} clips, resolution {args.resolution}",
            "plans": plans,
            "runs": runs,
        }
        print(json.dumps(result, indent=1))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
