"""python -m evaluation compare|run|protocol make (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from evaluation.distribution import DEFAULT_PROTOCOL, PROTOCOLS
from evaluation.faces import BACKENDS
from evaluation.locations import local_checkpoint, local_output
from evaluation.protocol import REFERENCES, Benchmark, make_benchmark, read_benchmark, write_benchmark
from pipeline import storage

DEFAULT_BACKEND = "insightface"


def add_protocol_make(sub: argparse._SubParsersAction) -> None:
    protocol = sub.add_parser("protocol", help="fixed evaluation sets (protocol files)")
    actions = protocol.add_subparsers(dest="action", required=True)
    make = actions.add_parser("make", help="write a protocol file for a shard set's split")
    make.add_argument("--shards", required=True, help="the shard set's output folder or s3://... URI")
    make.add_argument("--split", default="test")
    make.add_argument(
        "--out", default=None, help="the file (.json, or .yaml / .yml); default protocol-<split>.json"
    )
    make.add_argument("--num-clips", type=int, default=0, help="the first N usable clips (0: every clip)")
    make.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    make.add_argument(
        "--stride", type=int, default=1, help="every Nth source frame (1: the source frame rate)"
    )
    make.add_argument("--reference", choices=REFERENCES, default="first", help="the clip's reference frame")
    make.add_argument("--resolution", type=int, default=512, help="frames are scored at this size²")
    make.add_argument("--seed", type=int, default=0, help="draws the cross pairs")
    make.add_argument("--no-cross", action="store_true", help="no cross-reenactment pairs")
    make.add_argument("--distribution", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL)
    make.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND)


def resolve_protocol(value: str) -> tuple[str, Benchmark | None]:
    """--protocol: a FID/FVD protocol name, or a protocol file (whose settings name one)."""
    if value in PROTOCOLS:
        return value, None
    if not storage.is_file(value):
        raise SystemExit(
            f"--protocol {value}: neither a protocol file nor one of {sorted(PROTOCOLS)}; "
            "write a file with `python -m evaluation protocol make`"
        )
    benchmark = read_benchmark(value)
    return benchmark.metrics["distribution"]["name"], benchmark


def results_line(out: str) -> str:
    return (
        f"results: {storage.join(out, 'results.md') if storage.is_remote(out) else Path(out) / 'results.md'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="folder (or s3://... URI) for metrics.json and the rest")
    common.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help=f"default: the protocol file's, else {DEFAULT_BACKEND}",
    )
    common.add_argument("--weights-dir", default=None, help="default: $WEIGHTS_DIR")
    common.add_argument("--device", default="auto", help="auto, cpu or cuda")
    common.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        help=f"a protocol file (python -m evaluation protocol make), or a FID/FVD sampling protocol name "
        f"({', '.join(sorted(PROTOCOLS))}); below its N the metric is named fid_n<N> / fvd_n<N>",
    )

    compare = sub.add_parser("compare", parents=[common], help="score any method's output video")
    compare.add_argument("--pred", type=Path, default=None, help="the generated video")
    compare.add_argument("--pred-dir", type=Path, default=None,
                         help="with --protocol FILE: a method's videos, <clip key>.mp4 and cross/<driving key>.mp4")  # fmt: skip
    compare.add_argument("--shards", default=None, help="with --protocol FILE: where its shards are now")
    compare.add_argument("--target", type=Path, default=None, help="ground truth (self reenactment)")
    compare.add_argument(
        "--reference", type=Path, default=None, help="reference image (default: target's frame 0)"
    )
    compare.add_argument("--driving", type=Path, default=None, help="driving video (default: the target)")

    run = sub.add_parser(
        "run", parents=[common], help="generate with a checkpoint on held-out clips, then score"
    )
    run.add_argument(
        "--checkpoint", required=True, help="a megactor checkpoint, run folder or s3://... URI of either"
    )
    run.add_argument("--shards", default=None, help="the shard set's output folder or s3://... URI")
    run.add_argument("--split", default="test")
    run.add_argument("--num-clips", type=int, default=8)
    run.add_argument("--num-frames", type=int, default=16, help="frames generated per clip")
    run.add_argument("--steps", type=int, default=25, help="DDIM steps")
    run.add_argument(
        "--cross", action="store_true", help="also cross reenactment (reference of another clip)"
    )
    run.add_argument("--grid-clips", type=int, default=2, help="side-by-side videos for this many clips")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--resolution", type=int, default=None, help="default: the run's training resolution")
    run.add_argument("--stride", type=int, default=1,
                     help="every Nth source frame (1: every frame, the source frame rate)")  # fmt: skip
    run.add_argument(
        "--reference-frame", choices=REFERENCES, default="first", help="the clip's reference frame"
    )
    run.add_argument("--guidance-scale", type=float, default=4.5)
    run.add_argument(
        "--model-weights-dir", default=None, help="MegActor's components (default: the run's own)"
    )
    tiny = sub.add_parser(
        "tiny-weights", help="write every evaluation network with random weights (tests, demo)"
    )
    tiny.add_argument("dir", type=Path)
    add_protocol_make(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "tiny-weights":
        from evaluation.tiny import write_tiny_eval_weights

        print(write_tiny_eval_weights(args.dir))
        return 0
    if args.command == "protocol":
        return make_protocol_file(args)
    distribution, benchmark = resolve_protocol(args.protocol)
    backend = args.backend or (benchmark.metrics.get("backend") if benchmark else None) or DEFAULT_BACKEND
    if args.command == "compare":
        return compare_command(parser, args, distribution, benchmark, backend)
    from evaluation.run import RunOptions, evaluate_checkpoint

    if benchmark is None and args.shards is None:
        parser.error("run needs --shards (or --protocol FILE, which names its shards)")
    options = RunOptions(
        num_clips=args.num_clips, num_frames=args.num_frames, steps=args.steps, cross=args.cross,
        grid_clips=args.grid_clips, seed=args.seed, split=args.split, guidance_scale=args.guidance_scale,
        resolution=args.resolution, stride=args.stride, protocol=distribution, reference=args.reference_frame,
    )  # fmt: skip
    with local_checkpoint(args.checkpoint) as checkpoint, local_output(args.out) as out:
        table = evaluate_checkpoint(
            checkpoint,
            args.shards,
            out,
            options,
            backend,
            args.weights_dir,
            args.device,
            args.model_weights_dir,
            benchmark,
            args.protocol if benchmark else None,
        )
    print(table)
    print(results_line(args.out))
    return 0


def compare_command(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    distribution: str,
    benchmark: Benchmark | None,
    backend: str,
) -> int:
    from evaluation.compare import compare_protocol, compare_videos

    if benchmark is not None:
        if args.pred_dir is None:
            parser.error("compare --protocol FILE scores a folder of videos: pass --pred-dir DIR")
        with local_output(args.out) as out:
            summary = compare_protocol(
                benchmark,
                args.pred_dir,
                out,
                backend,
                args.weights_dir,
                args.device,
                args.shards,
                args.protocol,
            )
        print(
            json.dumps(
                {k: v["metrics"] for k, v in summary.items() if isinstance(v, dict) and "metrics" in v},
                indent=2,
            )
        )
        print(results_line(args.out))
        return 0
    if args.pred is None:
        parser.error("compare needs --pred (one video), or --protocol FILE with --pred-dir")
    if args.target is None and args.driving is None:
        parser.error("compare needs --target (self reenactment) or --driving (cross reenactment)")
    with local_output(args.out) as out:
        summary = compare_videos(
            args.pred,
            args.target,
            out,
            args.reference,
            args.driving,
            backend,
            args.weights_dir,
            args.device,
            distribution,
        )
    print(json.dumps(summary["metrics"], indent=2))
    print(results_line(args.out))
    return 0


def make_protocol_file(args: argparse.Namespace) -> int:
    benchmark = make_benchmark(
        args.shards, args.split, args.num_clips, args.num_frames, args.stride, args.reference,
        args.resolution, args.seed, not args.no_cross, args.distribution, args.backend,
    )  # fmt: skip
    path = args.out or f"protocol-{args.split}.json"
    write_benchmark(benchmark, path)
    print(
        f"{path}: {len(benchmark.clips)} clips x {benchmark.num_frames} frames (stride {benchmark.stride}), "
        f"{len(benchmark.cross_pairs)} cross pairs, {len(benchmark.excluded)} clips excluded, {benchmark.hash}"
    )
    return 0


def cli() -> int:
    """main() with input errors as one line (exit 2): a wrong path or a split that cannot give what was
    asked is the user's to fix, and the message says how; anything else keeps its traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
