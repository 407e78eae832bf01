"""Bucket assignment: which clips become real, face-swapped or stylised samples.

Decided per clip (every segment of a clip shares its bucket) before any GPU stage runs, so only the
swap bucket pays for swapping and only the style bucket for SDXL. A clip's bucket depends only on its
id, the seed and the mix, never on the order clips are read in.
"""

from __future__ import annotations

import hashlib

from pipeline.config import BUCKETS


def clip_uniform(dataset: str, clip_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (dataset, clip_id, seed)."""
    digest = hashlib.sha256(f"{seed}\x00{dataset}\x00{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def bucket_for(dataset: str, clip_id: str, seed: int, mix: dict[str, float]) -> str:
    """Map the clip's uniform number through the cumulative mix (real, swap, style)."""
    u = clip_uniform(dataset, clip_id, seed)
    edge = 0.0
    for bucket in BUCKETS:
        edge += mix[bucket]
        if u < edge:
            return bucket
    return next(b for b in reversed(BUCKETS) if mix[b] > 0)
