"""Per-frame identity and motion metrics from two videos' face analyses (evaluation/faces.py).

Every function returns one value per frame, NaN where either side has no face; the summary is the mean
over finite values (docs/evaluation.md)."""

from __future__ import annotations

import numpy as np


def cosine_to(embeddings: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Cosine similarity of each unit-length row (T, D) with `anchor` (D,): CSIM against the reference,
    identity leakage against the driving identity."""
    anchor = anchor / max(float(np.linalg.norm(anchor)), 1e-12)
    return (embeddings @ anchor).astype(np.float32)


def identity_of(embeddings: np.ndarray) -> np.ndarray:
    """One identity from a video's per-frame embeddings: their normalised mean over frames with a face."""
    rows = embeddings[np.isfinite(embeddings).all(axis=1)]
    if not len(rows):
        return np.full(embeddings.shape[1], np.nan, np.float32)
    mean = rows.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def keypoint_distance(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance (pixels) between corresponding landmarks, (T, K, 2) each: our
    `akd_euclid_512` on landmarks mapped to 512² (FOMM's `akd` is evaluation/keypoints.py's fomm_akd)."""
    return np.linalg.norm(pred - target, axis=-1).mean(axis=-1).astype(np.float32)


def pose_distance(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """APD: mean absolute difference of (pitch, yaw, roll) in degrees, angles wrapped to [-180, 180)."""
    diff = (pred - target + 180.0) % 360.0 - 180.0
    return np.abs(diff).mean(axis=-1).astype(np.float32)


def _procrustes_residual(source: np.ndarray, target: np.ndarray) -> float:
    """Mean point distance after the similarity transform (rotation, scale, translation) that best maps
    source onto target, divided by target's RMS radius: what is left is shape, not pose or size."""
    a = source - source.mean(0)
    b = target - target.mean(0)
    scale_b = np.sqrt((b**2).sum(axis=1).mean())
    u, s, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))  # no reflections
    correction = np.eye(a.shape[1])
    correction[-1, -1] = d
    rotation = u @ correction @ vt
    scale = (s * np.diag(correction)).sum() / max((a**2).sum(), 1e-12)
    residual = np.linalg.norm(scale * a @ rotation - b, axis=1).mean()
    return float(residual / max(scale_b, 1e-12))


def expression_distance(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """AED: per frame, the Procrustes residual between the two landmark shapes (T, K, 2|3)."""
    out = np.full(len(pred), np.nan, np.float32)
    for t in range(len(pred)):
        if np.isfinite(pred[t]).all() and np.isfinite(target[t]).all():
            out[t] = _procrustes_residual(pred[t].astype(np.float64), target[t].astype(np.float64))
    return out


def gaze_vectors(pitch_yaw: np.ndarray) -> np.ndarray:
    """(T, 2) pitch, yaw in radians -> (T, 3) unit gaze directions (L2CS's convention)."""
    pitch, yaw = pitch_yaw[:, 0], pitch_yaw[:, 1]
    return np.stack([-np.cos(pitch) * np.sin(yaw), -np.sin(pitch), -np.cos(pitch) * np.cos(yaw)], axis=1)


def gaze_angle(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Gaze error: angle in degrees between the two gaze directions."""
    dot = (gaze_vectors(pred) * gaze_vectors(target)).sum(axis=1)
    return np.degrees(np.arccos(np.clip(dot, -1.0, 1.0))).astype(np.float32)


def summarise(values: np.ndarray) -> tuple[float, int]:
    """(mean over finite values, how many there were); NaN and 0 when none."""
    finite = values[np.isfinite(values)]
    return (float(finite.mean()), int(len(finite))) if len(finite) else (float("nan"), 0)
