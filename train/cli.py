"""Command line of the stage jobs: `python jobs/stage2.py --config configs/train/tiny.yaml data.batch_size=2`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from train.config import load_train_config


def main(stage: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py",
        description=f"Train MegActor {stage} with Ray Train (configs/train/{stage}.yaml + overlays + key=value).",
    )
    parser.add_argument(
        "--config", action="append", default=[], help="a YAML overlay; repeatable, later wins"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections: data.batch_size=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_train_config(stage, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.print_config:
        json.dump(config.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    from train.ray_train import launch  # Ray and torch only once the config is known to be valid

    result = launch(config)
    if result.error:
        logging.getLogger("train").error("training failed: %s", result.error)
        return 1
    logging.getLogger("train").info(
        "finished: latest checkpoint %s, metrics %s", result.checkpoint, result.metrics
    )
    return 0
