"""Clip gaze scores (pipeline/gaze_scores.py) on synthetic tracks."""

import numpy as np
import pytest

from pipeline import gaze_scores as gs


def smooth_track(n=32, seed=0):
    """A calm talking-head gaze: small slow pitch/yaw motion around a slightly averted direction."""
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    pitch = 0.05 * np.sin(2 * np.pi * t / 17) + 0.005 * rng.standard_normal(n)
    yaw = -0.2 + 0.03 * np.cos(2 * np.pi * t / 23) + 0.005 * rng.standard_normal(n)
    return np.stack([pitch, yaw], axis=1)


def reference_authors(track):
    """The authors' lines, spelled out with scipy (their code), for tracks with sin(yaw) != 0."""
    ndimage = pytest.importorskip("scipy.ndimage")
    pitch, yaw = track[:, 0], track[:, 1]
    theta = np.arctan(np.sin(pitch) * np.cos(yaw) / np.sin(yaw)) / np.pi * 90
    return float(np.var(ndimage.maximum_filter1d(theta, size=3)))


def test_authors_score_matches_their_formula_on_random_tracks():
    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 32):
        track = rng.uniform(-1.2, 1.2, (n, 2))
        assert gs.authors_score(track) == pytest.approx(reference_authors(track), rel=1e-12, abs=1e-12)


def test_theta_units_and_range():
    # sin(p)cos(y)/sin(y) = 1 -> arctan = 45 degrees = π/4 -> θ = 22.5 ("half-degrees")
    yaw = 0.3
    pitch = np.arcsin(np.tan(yaw) * 1.0)
    assert gs.authors_theta(np.array([pitch]), np.array([yaw]))[0] == pytest.approx(22.5)
    theta = gs.authors_theta(*np.random.default_rng(2).uniform(-3, 3, (2, 1000)))
    assert np.all(np.abs(theta) <= 45)


def test_maximum_filter_matches_scipy_reflect():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 10):
        x = rng.standard_normal(n)
        np.testing.assert_array_equal(gs.maximum_filter3(x), ndimage.maximum_filter1d(x, size=3))


def test_yaw_zero_is_finite():
    theta = gs.authors_theta(np.array([0.3, -0.3, 0.0]), np.array([0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(theta, [45.0, -45.0, 0.0])  # numpy's x/+0 = ±inf -> ±45; 0/0 -> 0
    track = np.array([[0.3, 0.0], [0.0, 0.0], [0.1, 0.2]])
    assert np.isfinite(gs.authors_score(track))
    assert np.isfinite(gs.robust_spread_deg(track))


def test_nan_rows_are_dropped_and_short_tracks_are_nan():
    track = smooth_track(12)
    with_gaps = np.full((12 * 10, 2), np.nan)
    with_gaps[::10] = track
    assert gs.authors_score(with_gaps) == pytest.approx(gs.authors_score(track))
    assert gs.robust_spread_deg(with_gaps) == pytest.approx(gs.robust_spread_deg(track))
    one = np.full((10, 2), np.nan)
    one[0] = [0.1, 0.2]
    scores = gs.clip_scores(one)
    assert np.isnan(scores["authors"]) and np.isnan(scores["robust_spread_deg"]) and scores["samples"] == 1.0
    with pytest.raises(ValueError, match=r"\[T,2\]"):
        gs.clip_scores(np.zeros((4, 3)))


@pytest.mark.parametrize("where", [0, 13, 31])
def test_one_glitched_frame_moves_authors_score_a_lot_and_ours_little(where):
    track = smooth_track(32)
    glitched = track.copy()
    glitched[where] = [0.6, 0.02]  # one detector glitch: a wild pitch with yaw near 0
    base_a, glitch_a = gs.authors_score(track), gs.authors_score(glitched)
    base_r, glitch_r = gs.robust_spread_deg(track), gs.robust_spread_deg(glitched)
    # the authors' variance jumps by >100 half-degrees² (their keep threshold is 200) ...
    assert glitch_a - base_a > 100, (base_a, glitch_a)
    assert glitch_a > 4 * base_a
    # ... ours moves by well under a degree
    assert abs(glitch_r - base_r) < 0.5, (base_r, glitch_r)


def test_robust_score_sees_a_sustained_gaze_shift():
    calm = smooth_track(32)
    shifted = calm.copy()
    shifted[12:20, 1] += np.radians(25)  # looks 25° elsewhere for 8 samples (80 frames at every=10)
    assert gs.robust_spread_deg(calm) < 5
    assert gs.robust_spread_deg(shifted) > 20
    # two samples survive the median filter; the 90th percentile counts them once they are >10% of the clip
    short = calm[:12].copy()
    short[5:7, 1] += np.radians(25)
    assert gs.robust_spread_deg(short) > 20


def test_robust_score_is_an_angle_on_the_sphere():
    # 4 of 10 samples looking 30° to one side: the median direction stays ahead, the 90th percentile is 30°
    track = np.zeros((10, 2))
    track[6:, 0] = np.radians(30)
    assert gs.robust_spread_deg(track) == pytest.approx(30.0, abs=1e-6)
    vectors = gs.gaze_vectors(np.random.default_rng(4).uniform(-1, 1, (50, 2)))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_authors_score_ranks_a_steady_side_gaze_above_a_real_shift() -> None:
    """The figures docs/stage_gaze.md quotes: the authors' var(θ) keeps a steady gaze (jitter near yaw 0
    flips θ between ±45) and ranks it above a real 29° shift; the robust score orders them right."""
    rng = np.random.default_rng(0)
    n = 32
    steady = np.stack([np.full(n, np.radians(8.6)), rng.normal(0, np.radians(1.0), n)], 1)
    jitter = rng.normal(0, np.radians(1.0), n)
    shift = np.stack([np.r_[np.zeros(n // 2), np.full(n // 2, np.radians(29))], np.radians(5) + jitter], 1)
    assert gs.authors_score(steady) > 200 and gs.authors_score(steady) > gs.authors_score(shift)
    assert round(gs.authors_score(steady)) == 1228 and round(gs.authors_score(shift)) == 410
    assert gs.robust_spread_deg(steady) < 2 and gs.robust_spread_deg(shift) > 10
