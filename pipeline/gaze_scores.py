"""Clip-level gaze scores from per-frame (pitch, yaw) tracks; pure numpy, shared by the gaze stage and
the selection step.

Input everywhere: float [T,2] (pitch, yaw) in radians in L2CS's naming, NaN rows = frames that were
not computed (they are dropped, so the scores see the sampled frames in temporal order).

Two scores:

- `authors_score`: what MegActor's data filter computes (REFERENCE.md §2). Per sample
  θ = arctan(sin(pitch)·cos(yaw) / sin(yaw)) · 90/π, a 1-D maximum filter of size 3 over the samples,
  then the population variance of θ. arctan folds the image-plane direction of the gaze arrow into
  (-90°, 90°) and the 90/π factor halves it, so θ lies in (-45, 45) ("half-degrees"); the authors keep
  a clip when the variance exceeds 200. The maximum filter spreads an upward spike over three samples,
  so a single glitched frame weighs three times.
- `robust_spread_deg`: ours, in degrees of visual angle. Each sample becomes a unit gaze vector on the
  sphere; a running median of width 3 over the samples (the window moved inwards at both ends) removes
  any isolated one-sample glitch, the vectors are renormalised, their component-wise median
  (renormalised) is the clip's typical gaze direction, and the score is the 90th percentile of the
  angles between the filtered samples and that direction: the angle the gaze left its usual direction
  by, for at least a tenth of the sampled time. An excursion held for two or more consecutive samples
  (20 frames at every=10) survives the filter and counts once it covers more than 10% of the samples;
  a single-sample excursion does not count at all.
"""

from __future__ import annotations

import numpy as np

AUTHORS_MAX_FILTER = 3
AUTHORS_KEEP_ABOVE = 200.0  # the authors keep a clip when var(θ) > 200
ROBUST_PERCENTILE = 90.0


def valid_samples(gaze: np.ndarray) -> np.ndarray:
    """The finite rows of a [T,2] track, in order (float64 [N,2])."""
    gaze = np.asarray(gaze, np.float64)
    if gaze.ndim != 2 or gaze.shape[1] != 2:
        raise ValueError(f"expected gaze [T,2] (pitch, yaw), got shape {gaze.shape}")
    return gaze[np.isfinite(gaze).all(axis=1)]


def authors_theta(pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """θ = arctan(sin(pitch)·cos(yaw)/sin(yaw))·90/π, in (-45, 45).

    sin(yaw) == 0 (the arrow is horizontal): the authors' numpy division gives ±inf for a +0 denominator,
    so θ = +45 · sign(sin(pitch)·cos(yaw)); when the numerator is 0 too (gaze straight at the camera,
    numpy's 0/0 = NaN) θ = 0, so one such frame cannot turn the whole clip's score into NaN.
    """
    pitch, yaw = np.asarray(pitch, np.float64), np.asarray(yaw, np.float64)
    num = np.sin(pitch) * np.cos(yaw)
    den = np.sin(yaw)
    zero = den == 0
    ratio = np.divide(num, den, out=np.zeros_like(num), where=~zero)
    theta = np.arctan(ratio) * 90.0 / np.pi
    return np.where(zero, 45.0 * np.sign(num), theta)


def maximum_filter3(x: np.ndarray) -> np.ndarray:
    """scipy.ndimage.maximum_filter1d(x, size=3) with its default 'reflect' border, in numpy."""
    padded = np.concatenate([x[:1], x, x[-1:]])
    return np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])


def authors_score(gaze: np.ndarray) -> float:
    """var(maxfilter3(θ)) over the computed samples; NaN with fewer than 2 samples."""
    samples = valid_samples(gaze)
    if len(samples) < 2:
        return float("nan")
    theta = authors_theta(samples[:, 0], samples[:, 1])
    return float(np.var(maximum_filter3(theta)))


def gaze_vectors(gaze: np.ndarray) -> np.ndarray:
    """(pitch, yaw) [N,2] -> unit vectors [N,3], L2CS's own convention (its `gazeto3d`)."""
    pitch, yaw = gaze[:, 0], gaze[:, 1]
    return np.stack([-np.cos(yaw) * np.sin(pitch), -np.sin(yaw), -np.cos(yaw) * np.cos(pitch)], axis=1)


def running_median3(x: np.ndarray) -> np.ndarray:
    """Median of each sample with its two neighbours along axis 0; the first and last samples use the
    nearest full window (samples 0-2 and N-3..N-1), so a glitch at either end is removed as well."""
    n = len(x)
    if n < 3:
        return x.copy()
    centres = np.clip(np.arange(n), 1, n - 2)
    windows = np.stack([x[centres - 1], x[centres], x[centres + 1]], axis=0)
    return np.median(windows, axis=0)


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between unit vectors (rows of a and b), degrees; atan2 form, accurate near 0."""
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    dot = np.sum(a * b, axis=-1)
    return np.degrees(np.arctan2(cross, dot))


def robust_spread_deg(gaze: np.ndarray, percentile: float = ROBUST_PERCENTILE) -> float:
    """90th percentile angle (degrees) between the median-filtered gaze vectors and their median
    direction; NaN with fewer than 2 samples."""
    samples = valid_samples(gaze)
    if len(samples) < 2:
        return float("nan")
    vectors = running_median3(gaze_vectors(samples))
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    centre = np.median(vectors, axis=0)
    norm = np.linalg.norm(centre)
    if norm < 1e-9:  # directions cancel out (an all-round spread): fall back to the mean
        centre = vectors.mean(axis=0)
        norm = max(np.linalg.norm(centre), 1e-12)
    centre = centre / norm
    return float(np.percentile(angle_deg(vectors, centre[None, :]), percentile))


def clip_scores(gaze: np.ndarray) -> dict[str, float]:
    """The scores recorded in a sample's `gaze_scores` (and as gaze_* columns of the index)."""
    return {
        "authors": authors_score(gaze),
        "robust_spread_deg": robust_spread_deg(gaze),
        "samples": float(len(valid_samples(gaze))),
    }
