"""A stage that kills its own actor process on chosen clips (as a segfault or an OOM kill would), and a
build that runs it with a real local Ray (`main`, called from tests/test_actor_crash.py in a subprocess)."""

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
    """Kills its process on a row whose key holds a fragment of `crashes`, for as many tries of that row
    as the fragment's count (each try counted as a line in `attempts_dir`); later tries pass. Before each
    kill it leaves a half-written shard temp file in `orphan_dir`, as a writer killed with its node would."""

    name: ClassVar[str] = "crash_on_key"

    def __init__(
        self,
        weights_dir: str = "",
        crashes: dict[str, int] | None = None,
        attempts_dir: str = "",
        orphan_dir: str = "",
    ) -> None:
        self.crashes = crashes or {}
        self.attempts_dir = Path(attempts_dir)
        self.orphan_dir = Path(orphan_dir)

    def process(self, row: Row) -> Row:
        for fragment, times in self.crashes.items():
            if fragment in str(row["key"]):
                attempts = self.attempts_dir / f"{fragment}.attempts"
                with attempts.open("a") as f:
                    f.write("try\n")
                tried = len(attempts.read_text().splitlines())
                if tried <= times:
                    (self.orphan_dir / f".shard-{fragment}{tried}.tar.tmp-0badf00d").write_bytes(
                        b"half a tar"
                    )
                    os.kill(os.getpid(), signal.SIGKILL)
        return row


def main(root: str, out: str, crashes: str, max_task_retries: str) -> None:
    from pipeline.build import run_build
    from pipeline.config import load_build_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    options = {"crashes": json.loads(crashes), "attempts_dir": out, "orphan_dir": str(Path(out) / "shards")}
    # Two stages in one chained actor (the default plan): the retries and the failure row are the chain's.
    retries = int(max_task_retries)
    stages = [{"name": "crash_on_key", "num_cpus": 0.1, "options": {"crashes": {"no-such-clip": 99}}, "max_task_retries": retries},
              {"name": "crash_on_key", "num_cpus": 0.1, "options": options, "max_task_retries": retries}]  # fmt: skip
    overrides = ["profile=tiny", "resolution=64", "min_frames=8", "samples_per_shard=1", "max_failure_fraction=1.0", "num_cpus=2",
                 "task_num_cpus=0.5", f"stages={json.dumps(stages)}"]  # fmt: skip
    Path(out).mkdir(parents=True, exist_ok=True)
    config = load_build_config("celebvhq", overrides=overrides, root=root, out=out)
    summary = run_build(config, progress=False)
    # A file, not stdout: Ray's own output may follow on stdout.
    (Path(out) / "crash_summary.json").write_text(
        json.dumps({"written": summary.written, "failed": summary.failed_clips})
    )


def crashing_embedder(identity: str, attempts: Path) -> type:
    """An IdentityEmbedder that kills its process on the first try of a batch holding `identity` (tries
    counted as lines in `attempts`), as an OOM kill or a lost node would; later tries embed as usual."""
    from pipeline.identity_bank import IdentityEmbedder

    class CrashingEmbedder(IdentityEmbedder):
        def __call__(self, batch: dict) -> dict:
            if identity in [str(i) for i in batch["identity"]]:
                with attempts.open("a") as f:
                    f.write("try\n")
                if len(attempts.read_text().splitlines()) == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return CrashingEmbedder
