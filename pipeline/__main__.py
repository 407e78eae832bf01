"""Command line: `python -m pipeline build --dataset demo --root DIR --out DIR [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.build import RecipeMismatch, run_build
from pipeline.config import DATASETS, load_build_config
from pipeline.sources.base import SourceError

log = logging.getLogger("pipeline")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or resume building) a shard set")
    build.add_argument("--dataset", choices=DATASETS, default="demo")
    build.add_argument("--root", required=True, help="dataset folder (demo: where to generate it)")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--config", help="YAML config (default: configs/data/<dataset>.yaml)")
    build.add_argument("--overwrite", action="store_true", help="delete earlier output and start over")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. resolution=256"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_build_config(args.dataset, args.config, args.overrides, root=args.root, out=args.out)
        summary = run_build(config, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, SourceError, RecipeMismatch) as exc:
        log.error("%s", exc)
        return 2
    for line in summary.lines():
        log.info("summary: %s", line)
    if summary.failure_fraction > config.max_failure_fraction:
        log.error(
            "%.1f %% of clips failed, above max_failure_fraction %.1f %%; see %s/failures.parquet",
            100 * summary.failure_fraction,
            100 * config.max_failure_fraction,
            config.out,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
