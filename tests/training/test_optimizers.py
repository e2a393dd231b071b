"""Tests for make_optimizer: bounded LSQ step-size updates, the fused update kernels."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import graph_op_types

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


def _three_updates(monkeypatch, fused, strategy=None, **kwargs):
    """The variable and the optimizer's slots after three updates in one tf.function, and
    the op types of the traced update. With a two-replica ``strategy`` each replica sends
    half the gradient (halves sum exactly to it)."""
    monkeypatch.setenv("METAMIX_TF_FUSED_OPTIMIZER", "1" if fused else "0")
    rng = np.random.default_rng(0)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        v = keras.Variable(rng.normal(0.0, 1.0, (4, 3)).astype(np.float32), aggregation="mean")
        opt = optimizers.make_optimizer(0.01, [v], weight_decay=1e-2, **kwargs)
    grads = [tf.constant(rng.normal(0.0, 1.0, (4, 3)), tf.float32) for _ in range(3)]

    @tf.function
    def update(g):  # the share is computed per replica (a captured tensor cannot be reduced)
        replicas = float(strategy.num_replicas_in_sync)
        strategy.run(lambda: opt.apply_gradients([(g / replicas, v)]))

    for g in grads:
        update(g)
    slots = [keras.ops.convert_to_numpy(w) for w in opt.variables if w.shape == v.shape]
    return [keras.ops.convert_to_numpy(v), *slots], graph_op_types(
        update.get_concrete_function(grads[0]).graph), v


@pytest.mark.parametrize("kwargs", [dict(kind="sgd", momentum=0.9, nesterov=True),
                                    dict(kind="sgd", momentum=0.9, nesterov=False),
                                    dict(kind="sgd", momentum=0.0)],
                         ids=["nesterov", "momentum", "plain"])
def test_fused_sgd_is_keras_sgd_bit_for_bit(monkeypatch, kwargs):
    """The kernels run Keras' float32 operations in Keras' order: equal values."""
    fused, fused_ops, _ = _three_updates(monkeypatch, True, **kwargs)
    keras_values, keras_ops, _ = _three_updates(monkeypatch, False, **kwargs)
    kernel = ("ResourceApplyKerasMomentum" if kwargs["momentum"]
              else "ResourceApplyGradientDescent")
    assert kernel in fused_ops and kernel not in keras_ops
    for a, e in zip(fused, keras_values, strict=True):
        np.testing.assert_array_equal(a, e)


def test_fused_adam_is_keras_adam_up_to_its_constants_rounding(monkeypatch):
    """``ResourceApplyAdam`` takes ``1 - beta`` in float32 where Keras rounds it from a
    Python float: ``1 - 0.999f`` is 1.3e-5 off 0.001 (relative ``delta``; 2.2e-7 for 0.9).
    So each of three updates moves a moment by at most ``delta`` of the largest term plus
    the same ops' rounding (2 ulp), and the variable by a far smaller part of its scale:
    ``3 * (delta + 2^-22)`` of each array's largest value bounds the difference."""
    fused, fused_ops, _ = _three_updates(monkeypatch, True)
    keras_values, keras_ops, _ = _three_updates(monkeypatch, False)
    assert "ResourceApplyAdam" in fused_ops and "ResourceApplyAdam" not in keras_ops
    assert len(fused) == 3  # the variable, its first and second moments
    delta = max(abs((np.float32(1) - np.float32(beta)) / np.float32(1 - beta) - 1)
                for beta in (0.9, 0.999))
    assert 1e-5 < delta < 2e-5
    for a, e in zip(fused, keras_values, strict=True):
        np.testing.assert_allclose(a, e, rtol=0,
                                   atol=3 * (delta + 2.0 ** -22) * np.max(np.abs(e)))
    assert not np.array_equal(fused[2], keras_values[2])  # the constants do differ


def test_fused_updates_reach_both_replicas(monkeypatch, two_cpu_strategy):
    """Under MirroredStrategy each device's copy is updated with the summed gradient."""
    kwargs = dict(kind="sgd", momentum=0.9, nesterov=True)
    expected = _three_updates(monkeypatch, False, **kwargs)[0]
    *_, v = _three_updates(monkeypatch, True, two_cpu_strategy, **kwargs)
    copies = [copy.numpy() for copy in v.value.values]
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_array_equal(copy, expected[0])


def _scheduled_updates(monkeypatch, fused, count, kind, strategy=None):
    """``count`` variables after three updates on a cosine schedule with weight decay, and
    the number of ops in the traced update."""
    monkeypatch.setenv("METAMIX_TF_FUSED_OPTIMIZER", "1" if fused else "0")
    rng = np.random.default_rng(1)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        variables = [keras.Variable(rng.normal(0.0, 1.0, (3, 2)).astype(np.float32),
                                    aggregation="mean") for _ in range(count)]
        opt = optimizers.make_optimizer(optimizers.cosine_schedule(0.1, 10, 2), variables,
                                        weight_decay=0.1, kind=kind)
    grads = [[tf.constant(rng.normal(0.0, 1.0, (3, 2)), tf.float32) for _ in variables]
             for _ in range(3)]
    replicas = strategy.num_replicas_in_sync

    def replica_fn(*g):  # each replica's own share (one tensor for all would not reduce)
        shares = [x / float(replicas) for x in g] if replicas > 1 else g
        opt.apply_gradients(list(zip(shares, variables, strict=True)))

    @tf.function(autograph=False)
    def update(*g):
        strategy.run(replica_fn, args=g)

    for g in grads:
        update(*g)
    ops = len(update.get_concrete_function(*grads[0]).graph.get_operations())
    return [keras.ops.convert_to_numpy(v) for v in variables], ops


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_step_scalars_are_built_once_per_step(monkeypatch, kind):
    """Keras builds the scheduled learning rate (for each decayed variable, twice), the
    casts and Adam's ``b^t`` for every variable (Adam: 57 ops per variable here); the
    fused optimizer builds them once per step, so a variable adds only its own update (the
    decay's read, two products and assignment, the kernel, the distribution's wrapping), and
    the values stay the Keras ops' (SGD bit for bit; Adam within the constants' rounding of
    ``test_fused_adam_is_keras_adam_up_to_its_constants_rounding``)."""
    one = _scheduled_updates(monkeypatch, True, 1, kind)[1]
    values, eleven = _scheduled_updates(monkeypatch, True, 11, kind)
    keras_values, keras_eleven = _scheduled_updates(monkeypatch, False, 11, kind)
    keras_one = _scheduled_updates(monkeypatch, False, 1, kind)[1]
    assert (eleven - one) / 10 <= 10 < (keras_eleven - keras_one) / 10
    for a, e in zip(values, keras_values, strict=True):
        if kind == "sgd":
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=0, atol=1e-4 * np.max(np.abs(e)))


def test_step_scalars_per_replica(monkeypatch, two_cpu_strategy):
    """Under MirroredStrategy each device's updates use that device's scalars: both copies
    of every variable end equal to the one-device result."""
    expected, _ = _scheduled_updates(monkeypatch, False, 3, "sgd")
    mirrored, _ = _scheduled_updates(monkeypatch, True, 3, "sgd", two_cpu_strategy)
    for value, e in zip(mirrored, expected, strict=True):
        np.testing.assert_array_equal(value, e)


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
