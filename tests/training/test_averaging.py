"""Tests for WeightAverage (SWA's running mean of weights)."""

import numpy as np
import pytest
import tensorflow as tf

from metamix_tf.training import averaging


def test_mean_of_snapshots_matches_numpy_and_resumes_from_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    snapshots = [[rng.normal(size=(3, 2)).astype(np.float32),
                  rng.normal(size=(4,)).astype(np.float32)] for _ in range(5)]
    variables = [tf.Variable(tf.zeros((3, 2))), tf.Variable(tf.zeros((4,)))]
    average = averaging.WeightAverage(variables)
    checkpoint = tf.train.Checkpoint(swa=average)
    for n, values in enumerate(snapshots[:3], start=1):
        for v, value in zip(variables, values, strict=True):
            v.assign(value)
        assert average.update() == n
    path = checkpoint.save(str(tmp_path / "ckpt"))

    # A fresh average restored from the checkpoint continues the same mean.
    resumed = averaging.WeightAverage(variables)
    tf.train.Checkpoint(swa=resumed).restore(path).assert_existing_objects_matched()
    for values in snapshots[3:]:
        for v, value in zip(variables, values, strict=True):
            v.assign(value)
        resumed.update()
    resumed.assign_to()
    # Running means in float32 against numpy's float64 mean: three float32 roundings per
    # update, each <= half an ulp of values below 4 in magnitude (2.4e-7): 5 updates < 1e-5.
    for i, v in enumerate(variables):
        np.testing.assert_allclose(v.numpy(), np.mean([s[i] for s in snapshots], axis=0,
                                                      dtype=np.float64), rtol=0, atol=1e-5)


def test_assign_before_any_snapshot_and_no_variables_are_refused():
    with pytest.raises(ValueError, match="No snapshot"):
        averaging.WeightAverage([tf.Variable(1.0)]).assign_to()
    with pytest.raises(ValueError, match="at least one variable"):
        averaging.WeightAverage([])


def test_start_from_continues_another_runs_mean():
    rng = np.random.default_rng(1)
    snapshots = [rng.normal(size=(3,)).astype(np.float32) for _ in range(6)]
    variable = tf.Variable(tf.zeros((3,)))
    first = averaging.WeightAverage([variable])
    for value in snapshots[:4]:
        variable.assign(value)
        first.update()
    # Another run starts its mean at the first run's mean with the first run's count.
    second = averaging.WeightAverage([variable])
    second.start_from([first.means[0]], int(first.count.numpy()))
    for value in snapshots[4:]:
        variable.assign(value)
        assert second.update() in (5, 6)
    second.assign_to()
    # Six float32 running-mean updates of values below 4 in magnitude: < 1e-5 (as above).
    np.testing.assert_allclose(variable.numpy(), np.mean(snapshots, axis=0, dtype=np.float64),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="count >= 1"):
        second.start_from([first.means[0]], 0)
    with pytest.raises(ValueError, match="one per variable"):
        second.start_from([], 3)
