"""Input errors of `python -m evaluation` are one line naming the problem (exit 2), not a traceback."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_shard_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "evaluation", "protocol", "make", "--shards", str(tmp_path / "nothing"),
         "--split", "test", "--out", str(tmp_path / "protocol.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nothing" in last, result.stderr[-2000:]
