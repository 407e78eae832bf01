"""The up-front check that every Ray node sees the build's folders (a real local Ray node)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.visibility import NotShared, check_nodes_see, missing_paths


def test_missing_paths_names_each_problem(tmp_path: Path) -> None:
    marker = tmp_path / ".visible"
    assert missing_paths({"root": str(tmp_path)}, "") == []
    problems = missing_paths({"root": str(tmp_path), "WEIGHTS_DIR": str(tmp_path / "w")}, str(marker))
    assert problems == [
        f"WEIGHTS_DIR {tmp_path / 'w'} does not exist here",
        f"the driver's marker {marker} is not visible: the output folder is not shared",
    ]


@pytest.mark.slow
def test_every_node_is_asked_and_one_error_lists_the_problems(tmp_path: Path) -> None:
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        check_nodes_see({"dataset root": str(tmp_path)}, tmp_path)  # a single node sees it all
        assert not list(tmp_path.glob(".visible-*"))  # the marker is gone
        with pytest.raises(NotShared, match=r"node [\d.]+ \(\w+\): WEIGHTS_DIR /nowhere does not exist"):
            check_nodes_see({"WEIGHTS_DIR": "/nowhere"}, tmp_path)
    finally:
        ray.shutdown()
