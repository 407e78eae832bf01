"""python -m evaluation compare|run (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from evaluation.distribution import DEFAULT_PROTOCOL, PROTOCOLS
from evaluation.faces import BACKENDS
from evaluation.locations import local_checkpoint, local_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="folder (or s3://... URI) for metrics.json and the rest")
    common.add_argument("--backend", choices=BACKENDS, default="insightface")
    common.add_argument("--weights-dir", default=None, help="default: $WEIGHTS_DIR")
    common.add_argument("--device", default="auto", help="auto, cpu or cuda")
    common.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="FID/FVD sampling protocol; below its N the metric is named fid_n<N> / fvd_n<N>",
    )

    compare = sub.add_parser("compare", parents=[common], help="score any method's output video")
    compare.add_argument("--pred", type=Path, required=True, help="the generated video")
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
    run.add_argument("--shards", required=True, help="the shard set's output folder or s3://... URI")
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
    run.add_argument("--stride", type=int, default=2, help="frame stride of the generated clips")
    run.add_argument("--guidance-scale", type=float, default=4.5)
    run.add_argument(
        "--model-weights-dir", default=None, help="MegActor's components (default: the run's own)"
    )
    tiny = sub.add_parser(
        "tiny-weights", help="write every evaluation network with random weights (tests, demo)"
    )
    tiny.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "tiny-weights":
        from evaluation.tiny import write_tiny_eval_weights

        print(write_tiny_eval_weights(args.dir))
        return 0
    if args.command == "compare":
        from evaluation.compare import compare_videos

        if args.target is None and args.driving is None:
            parser.error("compare needs --target (self reenactment) or --driving (cross reenactment)")
        with local_output(args.out) as out:
            summary = compare_videos(
                args.pred,
                args.target,
                out,
                args.reference,
                args.driving,
                args.backend,
                args.weights_dir,
                args.device,
                args.protocol,
            )
        print(json.dumps(summary["metrics"], indent=2))
        return 0
    from evaluation.run import RunOptions, evaluate_checkpoint

    options = RunOptions(
        num_clips=args.num_clips, num_frames=args.num_frames, steps=args.steps, cross=args.cross,
        grid_clips=args.grid_clips, seed=args.seed, split=args.split, guidance_scale=args.guidance_scale,
        resolution=args.resolution, stride=args.stride, protocol=args.protocol,
    )  # fmt: skip
    with local_checkpoint(args.checkpoint) as checkpoint, local_output(args.out) as out:
        table = evaluate_checkpoint(
            checkpoint,
            args.shards,
            out,
            options,
            args.backend,
            args.weights_dir,
            args.device,
            args.model_weights_dir,
        )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
