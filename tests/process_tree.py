"""Memory of a process and everything it started (a build's CLI, its Ray launcher and Ray's processes)."""

from __future__ import annotations

import contextlib

import psutil


def tree_memory(process: psutil.Process) -> tuple[int, int, list[psutil.Process]]:
    """Summed RSS and PSS of a process and all its descendants, and those processes.

    RSS counts a page shared by several processes (torch's and Ray's libraries) once per process; PSS
    divides it among them, so summed PSS is the tree's real footprint."""
    members = [process]
    with contextlib.suppress(psutil.Error):
        members += process.children(recursive=True)
    rss = pss = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            info = member.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
    return rss, pss, members
