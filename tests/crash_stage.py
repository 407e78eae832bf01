"""A stage that kills its own actor process on one clip (as a segfault or an OOM kill would), and a build
that runs it with a real local Ray (`main`, called from tests/test_actor_crash.py in a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import ClassVar

import ray.cloudpickle

from pipeline.rows import Row
from pipeline.stages.base import Stage, register_stage


@register_stage
class CrashOnKey(Stage):
    name: ClassVar[str] = "crash_on_key"

    def __init__(self, weights_dir: str = "", key_fragment: str = "") -> None:
        self.key_fragment = key_fragment

    def process(self, row: Row) -> Row:
        if self.key_fragment in str(row["key"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return row


def main(root: str, out: str, key_fragment: str) -> None:
    from pipeline.build import run_build
    from pipeline.config import load_build_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    # Two stages in one chained actor (the default plan): the retries and the failure row are the chain's.
    stages = [{"name": "crash_on_key", "num_cpus": 0.1, "options": {"key_fragment": "no-such-clip"}},
              {"name": "crash_on_key", "num_cpus": 0.1, "options": {"key_fragment": key_fragment}}]  # fmt: skip
    overrides = ["profile=tiny", "resolution=64", "min_frames=8", "samples_per_shard=1", "max_failure_fraction=1.0", "num_cpus=2",
                 "task_num_cpus=0.5", f"stages={json.dumps(stages)}"]  # fmt: skip
    config = load_build_config("celebvhq", overrides=overrides, root=root, out=out)
    summary = run_build(config, progress=False)
    # A file, not stdout: Ray's own output may follow on stdout.
    (Path(out) / "crash_summary.json").write_text(
        json.dumps({"written": summary.written, "failed": summary.failed_clips})
    )
