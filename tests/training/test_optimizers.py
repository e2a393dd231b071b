"""Tests for make_optimizer's bounded LSQ step-size updates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from metamix_tf.training import optimizers


def _sgd_step(values, gradient, lr, step_sizes=True, **kwargs):
    v = keras.Variable(np.array(values, np.float32))
    opt = optimizers.make_optimizer(float(lr), [v], kind="sgd", momentum=0.0, nesterov=False,
                                    step_sizes=[v] if step_sizes else (), **kwargs)
    opt.apply_gradients([(tf.constant(gradient, tf.float32), v)])
    return keras.ops.convert_to_numpy(v)


def test_step_sizes_get_min_of_lr_and_a_fraction_of_themselves():
    s = np.array([1e-4, 0.05, 2.0], np.float32)
    g = np.array([3.0, -1.0, 0.5], np.float32)
    lr = np.float32(0.01)
    bounded = np.minimum(lr, np.float32(0.1) * s)  # the same float32 ops: exact
    np.testing.assert_array_equal(_sgd_step(s, g, lr), s - bounded * g)
    np.testing.assert_array_equal(_sgd_step(s, g, lr, max_relative_step_update=0.5),
                                  s - np.minimum(lr, np.float32(0.5) * s) * g)
    # Other variables, and steps above lr / 0.1, train with the plain learning rate.
    np.testing.assert_array_equal(_sgd_step(s, g, lr, step_sizes=False), s - lr * g)
    assert _sgd_step(s, g, lr)[2] == s[2] - lr * g[2]
    with pytest.raises(ValueError, match=r"Received: max_relative_step_update=0"):
        _sgd_step(s, g, lr, max_relative_step_update=0)


def test_adam_cannot_collapse_a_small_step_size():
    # Adam moves by ~lr per update: a plain Adam step of 1e-4 at lr 1e-3 crosses zero in
    # one update; bounded, it loses at most ~10% per update (first update: exactly
    # 0.1 * s * g / (|g| + eps) with bias correction).
    plain = keras.Variable(np.array([1e-4], np.float32))
    step = keras.Variable(np.array([1e-4], np.float32))
    opt_plain = optimizers.make_optimizer(1e-3, [plain])
    opt = optimizers.make_optimizer(1e-3, [step], step_sizes=[step])
    for _ in range(20):
        opt_plain.apply_gradients([(tf.constant([1.0]), plain)])
        opt.apply_gradients([(tf.constant([1.0]), step)])
    assert float(plain.numpy()[0]) < 0
    # Each update multiplies the step by at least 1 - 0.1 * |m_hat| / sqrt(v_hat), and
    # that ratio is 1 for a constant gradient: 20 updates leave 0.9 ** 20 of it.
    assert float(step.numpy()[0]) == pytest.approx(1e-4 * 0.9 ** 20, rel=1e-4)


def test_bounded_steps_under_tf_function_and_two_replicas(two_cpu_strategy):
    strategy = two_cpu_strategy
    with strategy.scope():
        v = keras.Variable(np.array([1e-3, 1.0], np.float32), aggregation="mean")
        opt = optimizers.make_optimizer(0.01, [v], kind="sgd", momentum=0.0,
                                        nesterov=False, step_sizes=[v])

    @tf.function
    def step():
        def replica_fn():
            opt.apply_gradients([(tf.constant([1.0, 1.0]), v)])
        strategy.run(replica_fn)

    step()
    # Gradients are summed over the two replicas (each 1.0).
    np.testing.assert_allclose(v.numpy(), [1e-3 - 1e-4 * 2, 1.0 - 0.01 * 2], rtol=1e-6)


def test_cosine_schedule_ends_at_its_final_fraction():
    lr, total, warmup = 0.05, 100, 10
    decayed = optimizers.cosine_schedule(lr, total, warmup)
    held = optimizers.cosine_schedule(lr, total, warmup, final_fraction=1.0)
    floor = optimizers.cosine_schedule(lr, total, 0, final_fraction=0.2)
    value = lambda schedule, step: float(schedule(step))  # noqa: E731
    # The same linear warm-up; then cosine to 0, a constant rate, or cosine to 0.2 * lr.
    assert value(decayed, 5) == value(held, 5) == pytest.approx(lr / 2, rel=1e-6)
    assert value(decayed, total) == 0.0
    assert [value(held, s) for s in (10, 50, 100)] == pytest.approx([lr] * 3, rel=1e-6)
    midway = lr * (0.2 + 0.8 * 0.5)  # cos(pi / 2) = 0
    assert [value(floor, s) for s in (0, 50, 100)] == pytest.approx([lr, midway, 0.2 * lr],
                                                                     rel=1e-6)
    with pytest.raises(ValueError, match=r"Received: final_fraction=1.5"):
        optimizers.cosine_schedule(lr, total, final_fraction=1.5)
