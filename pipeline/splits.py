"""Held-out splits: every clip is train, val or test, and no identity is in two splits.

A dataset's own split folders decide first (VFHQ-Test -> test, VFHQ-Train -> train or val); every other
clip is drawn by a hash of its identity against the configured fractions. The draw depends only on
(split seed, dataset, identity), so adding clips or identities never moves an identity between splits.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

from pipeline.config import SplitConfig
from pipeline.sources.base import ClipRecord

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def identity_draw(dataset: str, identity: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, dataset, identity)."""
    digest = hashlib.sha256(f"split\0{seed}\0{dataset}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def drawn_split(draw: float, config: SplitConfig) -> str:
    if draw < config.test:
        return "test"
    if draw < config.test + config.val:
        return "val"
    return "train"


def assign_splits(records: list[ClipRecord], config: SplitConfig) -> dict[tuple[str, str], str]:
    """(dataset, clip_id) -> split for every record.

    An identity with any clip the dataset marks as test is test everywhere (a leak into training would
    be worse than a smaller training set); one the dataset marks as train is train or val (drawn, with
    val's share of what is not test); the rest follow the draw.
    """
    hints: dict[tuple[str, str], set[str]] = defaultdict(set)
    for record in records:
        hints[(record.dataset, record.identity)].add(record.split_hint or "")
    by_identity: dict[tuple[str, str], str] = {}
    moved: list[str] = []
    for (dataset, identity), marks in hints.items():
        draw = identity_draw(dataset, identity, config.seed)
        if "test" in marks:
            by_identity[(dataset, identity)] = "test"
            if marks - {"test"}:
                moved.append(f"{dataset}/{identity}")
        elif "train" in marks:
            val_share = config.val / (1.0 - config.test) if config.test < 1 else 0.0
            by_identity[(dataset, identity)] = "val" if draw < val_share else "train"
        else:
            by_identity[(dataset, identity)] = drawn_split(draw, config)
    if moved:
        log.warning(
            "%d identities have clips in and outside the dataset's test split; all their clips are test: %s",
            len(moved), ", ".join(moved[:5]) + (" ..." if len(moved) > 5 else ""),
        )  # fmt: skip
    return {(r.dataset, r.clip_id): by_identity[(r.dataset, r.identity)] for r in records}
