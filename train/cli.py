"""Command line of the stage jobs: `python jobs/stage2.py --config configs/train/tiny.yaml data.batch_size=2`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pipeline.logs import setup_logging
from train.config import TrainConfig, load_train_config

log = logging.getLogger("train")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # as python -m pipeline: a fixable input, Ctrl-C


def _launch(config: TrainConfig) -> Any:
    from train.ray_train import launch  # Ray and torch only once the config is known to be valid

    return launch(config)


def main(stage: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py",
        description=f"Train MegActor {stage} with Ray Train (configs/train/{stage}.yaml + overlays + key=value).",
    )
    parser.add_argument(
        "--config", action="append", default=[], help="a YAML overlay; repeatable, later wins"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--verbose", action="store_true", help="Ray's own log lines too (else in Ray's log folder)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections: data.batch_size=2")
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        config = load_train_config(stage, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.print_config:
        json.dump(config.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    from pipeline.ray_head import RayStartFailed
    from pipeline.resources import ResourceShortfall
    from train.preflight import PreflightError

    try:
        result = _launch(config)
    except KeyboardInterrupt:
        log.error(
            "interrupted: checkpoints up to the last one are kept under %s/%s; run the same command to resume",
            config.storage_path, config.name,
        )  # fmt: skip
        return EXIT_INTERRUPTED
    except (PreflightError, ResourceShortfall, RayStartFailed, FileNotFoundError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    if result.error:
        logging.getLogger("train").error("training failed: %s", result.error)
        return 1
    logging.getLogger("train").info(
        "finished: latest checkpoint %s, metrics %s", result.checkpoint, result.metrics
    )
    return 0
