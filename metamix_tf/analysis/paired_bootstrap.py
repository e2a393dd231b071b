"""Paired bootstrap confidence interval of an accuracy difference (issue 12's statistics).

Two methods evaluated on the same test images, each with one or more runs (search seeds):
``correct_a`` is ``[runs_a, images]`` (1 = correct), ``correct_b`` ``[runs_b, images]``.
The statistic is ``mean(correct_a) - mean(correct_b)``. Each resample draws, in this order,
``n`` image indices with replacement (the same for both methods: paired), then ``runs_a``
run indices of ``a`` and ``runs_b`` of ``b`` with replacement (runs are not paired: seed
``i`` of one searcher has nothing in common with seed ``i`` of another), and recomputes the
statistic; the interval is the percentile interval of the resampled statistics.
"""

from __future__ import annotations

import numpy as np

__all__ = ["paired_bootstrap"]


def _as_runs(correct, name: str) -> np.ndarray:
    x = np.asarray(correct, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"`{name}` must be [runs, images] (or [images]) of 0/1. "
                         f"Received: {name}.shape={np.shape(correct)}")
    return x


def paired_bootstrap(correct_a, correct_b, *, num_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """``{"diff", "low", "high", "acc_a", "acc_b", "runs_a", "runs_b", "images",
    "num_resamples"}``: the observed difference of mean accuracies (a - b) and its
    ``confidence`` percentile interval (see the module docstring for the resampling)."""
    a, b = _as_runs(correct_a, "correct_a"), _as_runs(correct_b, "correct_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError("Both methods must be evaluated on the same images. "
                         f"Received: {a.shape[1]} and {b.shape[1]} images")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError("`confidence` must be in (0, 1) and `num_resamples` >= 1. "
                         f"Received: confidence={confidence}, num_resamples={num_resamples}")
    n, ka, kb = a.shape[1], a.shape[0], b.shape[0]
    rng = np.random.default_rng(seed)
    stats = np.empty(num_resamples)
    for r in range(num_resamples):
        images = rng.integers(0, n, size=n)
        runs_a = rng.integers(0, ka, size=ka)
        runs_b = rng.integers(0, kb, size=kb)
        per_image = a[runs_a].mean(axis=0) - b[runs_b].mean(axis=0)
        stats[r] = np.bincount(images, minlength=n) @ per_image / n
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return {"diff": float(a.mean() - b.mean()), "low": float(low), "high": float(high),
            "acc_a": float(a.mean()), "acc_b": float(b.mean()), "runs_a": ka, "runs_b": kb,
            "images": n, "num_resamples": int(num_resamples)}
