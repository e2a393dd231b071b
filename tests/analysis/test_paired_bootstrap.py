"""The paired bootstrap against a plain numpy reference and the normal approximation."""

import numpy as np
import pytest

from metamix_tf.analysis.paired_bootstrap import paired_bootstrap


def _reference(a, b, num_resamples, seed, confidence):
    """The module docstring's recipe written out with fancy indexing."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(num_resamples):
        idx = rng.integers(0, a.shape[1], size=a.shape[1])
        ra = rng.integers(0, a.shape[0], size=a.shape[0])
        rb = rng.integers(0, b.shape[0], size=b.shape[0])
        stats.append(a[ra][:, idx].mean() - b[rb][:, idx].mean())
    tail = 50 * (1 - confidence)
    return np.percentile(stats, [tail, 100 - tail])


@pytest.mark.parametrize("runs_a,runs_b", [(1, 1), (2, 3)])
def test_matches_the_reference(runs_a, runs_b):
    rng = np.random.default_rng(1)
    a = (rng.random((runs_a, 300)) < 0.7).astype(np.int8)
    b = (rng.random((runs_b, 300)) < 0.6).astype(np.int8)
    got = paired_bootstrap(a, b, num_resamples=300, seed=7, confidence=0.9)
    low, high = _reference(a.astype(float), b.astype(float), 300, 7, 0.9)
    assert got["low"] == pytest.approx(low, abs=1e-12)
    assert got["high"] == pytest.approx(high, abs=1e-12)
    assert got["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)


def test_one_run_each_is_close_to_the_normal_interval_of_paired_differences():
    rng = np.random.default_rng(2)
    a = rng.random(5000) < 0.8
    b = np.where(rng.random(5000) < 0.9, a, ~a)  # correlated, as two quantized models are
    got = paired_bootstrap(a, b, num_resamples=3000, seed=0)
    d = a.astype(float) - b.astype(float)
    half = 1.959964 * d.std() / np.sqrt(len(d))
    # percentile vs normal interval, 3000 resamples: well within 10% of the half-width
    assert got["low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert got["high"] == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_pairing_narrows_the_interval_of_nearly_identical_models():
    rng = np.random.default_rng(3)
    a = rng.random(2000) < 0.7
    b = a.copy()
    b[:10] = ~b[:10]
    got = paired_bootstrap(a, b, num_resamples=500)
    assert got["high"] - got["low"] < 0.01  # unpaired it would be about 0.057


def test_bad_input():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="runs, images"):
        paired_bootstrap(np.ones((1, 2, 3)), np.ones(3))
