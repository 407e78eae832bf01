"""Ray Job entry point for MegActor stage 1.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/stage1.py \
        [--config configs/train/tiny.yaml] [key=value ...]

Also runs directly (`python jobs/stage1.py ...`): then Ray joins $RAY_ADDRESS or starts on loopback.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir holds `train`

from train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("stage1", sys.argv[1:]))
