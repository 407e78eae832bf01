"""Ray Job entry point for the shard builder.

    ray job submit --working-dir . -- python jobs/shards.py --dataset vfhq --root /data/vfhq --out /data/shards

Takes the same arguments as `python -m pipeline build`; inside a job Ray joins the job's cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir holds `pipeline`

from pipeline.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
