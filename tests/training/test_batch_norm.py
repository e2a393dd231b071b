"""metamix_tf.training.batch_norm: Keras BatchNormalization's training step on the fused kernel.

The fused kernel sums in another order than Keras' ops, so values are compared with a
tolerance from float32 summation: the batch statistics are sums of ``n`` terms, each with a
relative rounding error below ``n * eps`` (``eps = 2^-24``); every compared value here is a
smooth function of them with condition number near 1 (unit-variance data), so
``rtol = atol = 4 * n * eps`` of the values' scale bounds the difference.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import graph_op_types

from metamix_tf.training import batch_norm, steps

SHAPE = (8, 5, 5, 4)
N = SHAPE[0] * SHAPE[1] * SHAPE[2]
TOL = 4 * N * 2.0 ** -24


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, SHAPE).astype(np.float32)
    dy = rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
    return tf.constant(x), tf.constant(dy)


def _bn(**kwargs):
    layer = keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    layer.build(SHAPE)
    rng = np.random.default_rng(1)
    if layer.scale:
        layer.gamma.assign(rng.uniform(0.5, 2.0, SHAPE[-1]).astype(np.float32))
    if layer.center:
        layer.beta.assign(rng.normal(0.0, 1.0, SHAPE[-1]).astype(np.float32))
    return layer


def _train_step(layer, x, dy, fused):
    """Output, gradients (x, then the trainable weights) and moving statistics after one
    training call traced inside (or outside) ``fused_batch_norm``."""

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)

    inputs = keras.Input(SHAPE[1:])
    holder = keras.Model(inputs, keras.layers.Identity()(layer(inputs)))
    if fused:
        assert batch_norm.fusable(layer)
        with batch_norm.fused_batch_norm(holder):
            y, grads = run(x)
    else:
        y, grads = run(x)
    return ([y.numpy()] + [g.numpy() for g in grads]
            + [layer.moving_mean.numpy(), layer.moving_variance.numpy()])


@pytest.mark.parametrize("kwargs", [{}, {"center": False, "scale": False},
                                    {"epsilon": 1e-5}], ids=["affine", "plain", "eps"])
def test_fused_training_step_matches_keras(kwargs):
    x, dy = _data()
    expected = _train_step(_bn(**kwargs), x, dy, fused=False)
    actual = _train_step(_bn(**kwargs), x, dy, fused=True)
    names = ["y", "dx", *(["dgamma", "dbeta"] if kwargs.get("scale", True) else []),
             "moving_mean", "moving_variance"]
    assert len(actual) == len(names)
    for name, a, e in zip(names, actual, expected, strict=True):
        scale = np.max(np.abs(e))
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL * scale, err_msg=name)


def test_biased_variance_updates_the_moving_variance():
    """Keras updates the moving variance with the biased batch variance; the kernel returns
    the unbiased one, which is scaled back."""
    x, _ = _data()
    _, mean, variance = batch_norm.fused_batch_norm_train(x, tf.ones([4]), tf.zeros([4]), 1e-3)
    np.testing.assert_allclose(mean, np.mean(x.numpy().astype(np.float64), axis=(0, 1, 2)),
                               rtol=TOL)
    np.testing.assert_allclose(variance, np.var(x.numpy().astype(np.float64), axis=(0, 1, 2)),
                               rtol=TOL)


def test_only_fusable_layers_are_swapped_and_restored(monkeypatch):
    class OwnCall(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=training, mask=mask)

    stock, synced, own, first_axis = (keras.layers.BatchNormalization(),
                                      keras.layers.BatchNormalization(synchronized=True),
                                      OwnCall(), keras.layers.BatchNormalization(axis=1))
    before_relu, last = keras.layers.BatchNormalization(), keras.layers.BatchNormalization()
    inputs = keras.Input(SHAPE[1:])
    x = first_axis(own(synced(stock(inputs))))
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.ReLU()(before_relu(x))
    model = keras.Model(inputs, last(x))
    layers = (stock, synced, own, first_axis, before_relu, last)
    # before_relu: read by a plain ReLU; last: a model output (no graph says what reads it).
    assert [batch_norm.fusable(layer) for layer in layers] == [
        True, False, False, False, False, False]
    with batch_norm.fused_batch_norm(model):
        assert "call" in vars(stock)
        assert not any("call" in vars(layer) for layer in layers[1:])
    assert "call" not in vars(stock)
    monkeypatch.setenv("METAMIX_TF_FUSED_BATCH_NORM", "0")
    with batch_norm.fused_batch_norm(model):
        assert "call" not in vars(stock)


@pytest.mark.parametrize("relu_max", [None, 6.0], ids=["relu", "relu6"])
def test_a_nan_stays_a_nan_in_the_training_step(relu_max):
    """NaN weights give a NaN loss, so the trainer stops (grappler fuses BatchNorm + Relu
    into a kernel that maps NaN to 0, which is why a BatchNorm before a plain ReLU keeps
    Keras' ops)."""
    inputs = keras.Input(SHAPE[1:])
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = keras.layers.ReLU(relu_max)(keras.layers.BatchNormalization()(x))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    optimizer = keras.optimizers.SGD(0.0)
    optimizer.build(model.trainable_variables)
    step = steps.make_train_step(tf.distribute.get_strategy(), model, optimizer,
                                 model.trainable_variables)
    model.layers[1].kernel.assign(np.full(model.layers[1].kernel.shape, np.nan, np.float32))
    images, _ = _data()
    assert np.isnan(step(images, tf.zeros([SHAPE[0]], tf.int32))["loss_sum"].numpy())


def test_inference_and_other_inputs_keep_keras_call():
    """Inference, 2-D inputs and float64 run Keras' own call under the context."""
    layer = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((3,)), layer, keras.layers.Identity()])
    assert batch_norm.fusable(layer)
    x = tf.constant(np.random.default_rng(0).normal(size=(16, 3)), tf.float32)
    expected = layer(x, training=True).numpy()
    with batch_norm.fused_batch_norm(model):
        np.testing.assert_array_equal(layer(x, training=True), expected)
        np.testing.assert_array_equal(layer(x, training=False), layer(x, training=False))


def test_training_steps_trace_the_fused_kernel_and_eval_does_not():
    model = keras.Sequential([keras.Input(SHAPE[1:]), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(6.0),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    strategy = tf.distribute.get_strategy()
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    images = tf.zeros(SHAPE)
    labels = tf.zeros([SHAPE[0]], tf.int32)

    def op_types(step):
        return graph_op_types(step.get_concrete_function(images, labels).graph)

    train = op_types(steps.make_train_step(strategy, model, optimizer,
                                           model.trainable_variables))
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= train
    assert "SquaredDifference" not in train  # Keras' moments are not traced
    assert "FusedBatchNormV3" not in op_types(steps.make_eval_step(strategy, model))
    assert "call" not in vars(model.layers[1])  # the override is gone after tracing
