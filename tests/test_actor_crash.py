"""A clip that kills its actor is retried a bounded number of times, then becomes a failure row; the
rest of the build goes on (Ray Data alone would retry it forever)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from lookalike import REPO, make_celebvhq

pytestmark = pytest.mark.slow


def test_a_clip_that_kills_its_actor_becomes_a_failure_row(tmp_path: Path) -> None:
    root, out = tmp_path / "celebvhq", tmp_path / "out"
    make_celebvhq(root, {"aa_0": ("aa", 0, 12), "bb_1": ("bb", 1, 12), "cc_2": ("cc", 2, 12)})
    script = "import sys; sys.path.insert(0, 'tests'); import crash_stage; crash_stage.main(*sys.argv[1:])"
    command = [sys.executable, "-c", script, str(root), str(out), "bb_1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads((out / "crash_summary.json").read_text()) == {"written": 2, "failed": 1}
    index = pd.read_parquet(out / "index.parquet")
    assert sorted(index["clip_id"]) == ["aa_0", "cc_2"]
    failures = pd.read_parquet(out / "failures.parquet")
    assert list(failures["clip_id"]) == ["bb_1"] and failures["error"][0] == "task_failed"
    assert "3 times" in failures["message"][0]  # the first try and max_task_retries=2
