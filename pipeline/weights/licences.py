"""Licence gate: non-commercial / research-only weights are fetched only after the user accepts them
once (`--accept-licence NAME` or `all`); the acceptance is remembered in WEIGHTS_DIR/.weights/."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.weights.check import STATE_DIR, read_json, write_json
from pipeline.weights.manifest import WeightFile

log = logging.getLogger(__name__)


class LicenceNotAccepted(PermissionError):
    """Restricted licences the user has not accepted yet, all named in one message."""


def accepted_path(root: Path) -> Path:
    return Path(root) / STATE_DIR / "licences.json"


def gate_licences(root: Path, entries: Iterable[WeightFile], accept: Iterable[str] = ()) -> None:
    """Log every licence; raise LicenceNotAccepted naming each restricted entry not yet accepted."""
    entries = list(entries)
    accept = set(accept)
    path = accepted_path(root)
    accepted = read_json(path)
    for entry in entries:
        if entry.licence:
            log.info(
                "licence %-24s %s%s", entry.name, entry.licence, " (restricted)" if entry.restricted else ""
            )
    newly = {
        entry.name: entry.licence
        for entry in entries
        if entry.restricted and entry.name not in accepted and ("all" in accept or entry.name in accept)
    }
    if newly:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        accepted.update({name: {"licence": licence, "accepted_at": stamp} for name, licence in newly.items()})
        write_json(path, accepted)
    missing = [entry for entry in entries if entry.restricted and entry.name not in accepted]
    if missing:
        lines = [f"  {entry.name}: {entry.licence}" for entry in missing]
        raise LicenceNotAccepted(
            f"{len(missing)} file(s) are under non-commercial / research-only licences:\n"
            + "\n".join(lines)
            + "\nread them, then rerun with --accept-licence NAME (once per name) or --accept-licence all"
        )
