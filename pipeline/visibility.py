"""Before a build starts: can every Ray node see the folders the build shares?

On a cluster, the output folder, the dataset root and WEIGHTS_DIR must be one shared file system (NFS,
a mounted bucket). A node that sees a different (or no) folder under the same path would fail every
clip's decode, or write shards a rerun then calls stale; this turns that into one clear error up front.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)


class NotShared(RuntimeError):
    """A Ray node cannot see a folder the build needs."""


def missing_paths(paths: dict[str, str], marker: str) -> list[str]:
    """What this process cannot see: the named paths, and the marker file the driver wrote in the output
    folder (a local folder of the same name exists, but is not the driver's)."""
    problems = [
        f"{what} {path} does not exist here" for what, path in paths.items() if not os.path.exists(path)
    ]
    if marker:  # in a folder, or on an object store this node must reach with its own AWS environment
        try:
            if not storage.exists(marker):
                problems.append(
                    f"the driver's marker {marker} is not visible: the output folder is not shared"
                )
        except OSError as exc:
            problems.append(f"the output {marker} cannot be read here: {exc}")
    return problems


def check_nodes_see(paths: dict[str, str], out: Path | str) -> None:
    """Run `missing_paths` on every alive Ray node; one NotShared error listing every node's problems."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = storage.join(out, f".visible-{uuid.uuid4().hex[:8]}")
    storage.put_bytes(marker, b"written by the build driver; deleted after the check\n")
    try:
        probe = ray.remote(num_cpus=0)(missing_paths)
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        refs = {
            f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(paths, str(marker))
            for node in nodes
        }
        problems = [f"node {name}: {problem}" for name, ref in refs.items() for problem in ray.get(ref)]
    finally:
        storage.delete(marker)
    if problems:
        raise NotShared(
            "every Ray node must see the build's folders under the same paths (NFS or another shared file "
            "system): " + "; ".join(problems)
        )
    log.info("all %d Ray node(s) see %s", len(refs), ", ".join(paths))
