"""Bucket assignment: which clips become real, face-swapped or stylised samples.

Decided per clip (every segment of a clip shares its bucket) over the whole manifest, before any GPU
stage runs, so only the swap bucket pays for swapping and only the style bucket for SDXL.

Method (`assign_buckets`):

1. Every clip draws a uniform number u from sha256(seed, dataset, clip_id) and takes the bucket of u
   in the cumulative mix (real [0, 0.5), swap [0.5, 0.9), style [0.9, 1)). This draw never depends on
   the other clips, so it is stable when clips are added.
2. Repair: the draw hits the shares only up to sampling noise, and long clips skew the frame shares.
   Greedy single-clip moves then minimise sum over buckets of (clip share - target)² + (frame share -
   target)², taking at each step the move that lowers it most, until no move does. Each move changes
   a share by about 1/N, so the result sits within a few 1/N of the target by clips and by frames.

The result depends only on the set of (dataset, clip_id, num_frames), the seed and the mix (ties are
broken by u, then by id), never on the order clips are read in. Only the repaired clips can differ
from their own draw, so adding clips moves at most the clips repaired before plus those repaired
after: a few percent of the manifest (about 2 / sqrt(N) of it), never a wholesale reshuffle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pipeline.config import BUCKETS


def clip_uniform(dataset: str, clip_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (dataset, clip_id, seed)."""
    digest = hashlib.sha256(f"{seed}\x00{dataset}\x00{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def bucket_for(dataset: str, clip_id: str, seed: int, mix: dict[str, float]) -> str:
    """The clip's own draw: its uniform number through the cumulative mix (real, swap, style)."""
    u = clip_uniform(dataset, clip_id, seed)
    edge = 0.0
    for bucket in BUCKETS:
        edge += mix[bucket]
        if u < edge:
            return bucket
    return next(b for b in reversed(BUCKETS) if mix[b] > 0)


def assign_buckets(
    clips: Sequence[tuple[str, str, int]], seed: int, mix: dict[str, float]
) -> dict[tuple[str, str], str]:
    """(dataset, clip_id, num_frames) of every clip -> {(dataset, clip_id): bucket}, hitting the mix
    by clip count and by frame count (see the module docstring)."""
    if not clips:
        return {}
    u = [clip_uniform(d, c, seed) for d, c, _ in clips]
    order = sorted(range(len(clips)), key=lambda i: (u[i], clips[i][0], clips[i][1]))
    ids = [(clips[i][0], clips[i][1]) for i in order]
    frames = np.array([max(int(clips[i][2]), 0) for i in order], np.float64)
    current = np.array([BUCKETS.index(bucket_for(*ids[k], seed, mix)) for k in range(len(ids))])
    target = np.array([mix[b] for b in BUCKETS], np.float64)
    allowed = target > 0
    n, total = float(len(ids)), float(frames.sum()) or 1.0
    step = frames / total  # the frame share one clip carries
    for _ in range(len(ids)):
        clip_err = np.bincount(current, minlength=len(BUCKETS)) / n - target
        frame_err = np.bincount(current, weights=frames, minlength=len(BUCKETS)) / total - target
        # gain[k, d]: how much moving clip k from its bucket s to d lowers the objective
        s = current
        gain = np.full((len(ids), len(BUCKETS)), -np.inf)
        for d in np.flatnonzero(allowed):
            before = clip_err[s] ** 2 + clip_err[d] ** 2 + frame_err[s] ** 2 + frame_err[d] ** 2
            after = (
                (clip_err[s] - 1 / n) ** 2
                + (clip_err[d] + 1 / n) ** 2
                + (frame_err[s] - step) ** 2
                + (frame_err[d] + step) ** 2
            )
            gain[:, d] = np.where(s == d, -np.inf, before - after)
        k, d = np.unravel_index(int(np.argmax(gain)), gain.shape)  # first best: lowest u wins ties
        if gain[k, d] <= 1e-15:
            break
        current[k] = d
    return {ids[k]: BUCKETS[int(current[k])] for k in range(len(ids))}
