"""BatchNormalization's training forward on TensorFlow's fused kernel, for the step functions.

Keras 3's ``BatchNormalization`` computes its batch moments and the normalization with
separate TensorFlow ops (mean, squared difference, multiply, add, and their gradients: about
a dozen full passes over the tensor per layer and step); ``FusedBatchNormV3`` and its
gradient kernel do each direction in one. :func:`fused_batch_norm` swaps the fused kernel in
while a step function of :mod:`metamix_tf.training.steps` traces the model, for every layer
where it computes Keras' function and a NaN stays a NaN (see :func:`fusable`); other
graphs (a user's ``fit``, ``model.export``, the TFLite conversion) keep Keras' own call.
``METAMIX_TF_FUSED_BATCH_NORM=0`` (read when a step traces) keeps Keras' call in the step
functions too.

Forward (training): ``y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta`` with the batch
mean ``mu_B`` and the biased batch variance ``var_B`` over all axes but the last; the moving
statistics are updated as Keras does, ``m <- m * momentum + mu_B * (1 - momentum)`` and
``v <- v * momentum + var_B * (1 - momentum)`` (the kernel returns the unbiased variance,
``var_B * n / (n - 1)``, which is scaled back). Gradient: the kernel's exact gradient of the
same function. The values equal Keras' up to float32 rounding (the kernel sums in another
order), so results are not bit-identical to Keras' ops.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from metamix_tf.config import switched_on
from metamix_tf.quant import graph_rules as rules

__all__ = ["batch_norm_layers", "fused_batch_norm", "fusable", "fused_batch_norm_train"]

_KERAS_CALL = keras.layers.BatchNormalization.call


def batch_norm_layers(model) -> list:
    """Every ``keras.layers.BatchNormalization`` of ``model``, nested ones included."""
    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def fused_batch_norm_train(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor,
                           epsilon: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(y, mean, variance)`` of batch normalization in training mode over all axes of the
    4-D channels-last float32 ``x`` but the last: ``y`` as in the module docstring, ``mean``
    and the biased ``variance`` per channel. Gradient: ``FusedBatchNormGradV3``."""
    empty = tf.constant([], tf.float32)
    y, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    return y, mean, unbiased * ((n - 1.0) / tf.maximum(n, 1.0))


def _read_by_relu(layer) -> bool | None:
    """Whether a plain ReLU layer (TensorFlow's ``Relu`` op) reads ``layer``'s output; None
    when no graph says what reads it (a subclassed model's ``call``, a model output)."""
    readers = [node.operation for node in layer._outbound_nodes]
    if not readers:
        return None
    return any((isinstance(op, keras.layers.ReLU) and op.max_value is None)
               or (isinstance(op, keras.layers.Activation)
                   and rules.activation_name(op) == "relu") for op in readers)


def fusable(layer) -> bool:
    """Whether ``layer`` is a stock ``BatchNormalization`` (not a subclass with its own
    ``call``) that the fused kernel computes: not synchronized across replicas (the kernel
    sees one replica's batch), no batch renormalization, channels-last (checked per call:
    4-D float32 inputs, no mask), and read by layers of a functional graph none of which is
    a plain ReLU. (Grappler's remapper fuses ``FusedBatchNormV3`` + ``Relu`` into one oneDNN
    kernel whose ReLU maps NaN to 0: a diverged layer would train on with a finite loss.
    ReLU6, Add and every other reader keep a NaN a NaN.)"""
    return (isinstance(layer, keras.layers.BatchNormalization)
            and type(layer).call is _KERAS_CALL
            and not getattr(layer, "synchronized", False)
            and not getattr(layer, "renorm", False)
            and layer.axis in (-1, 3)
            and _read_by_relu(layer) is False)


def _fused_call(layer):
    """``layer.call`` with the fused kernel in training mode."""

    def call(inputs, training=None, mask=None):
        if not (training and layer.trainable) or mask is not None or inputs.shape.rank != 4 \
                or inputs.dtype != tf.float32:
            return _KERAS_CALL(layer, inputs, training=training, mask=mask)
        gamma = layer.gamma if layer.scale else tf.ones([inputs.shape[-1]], tf.float32)
        beta = layer.beta if layer.center else tf.zeros([inputs.shape[-1]], tf.float32)
        y, mean, variance = fused_batch_norm_train(inputs, gamma, beta, layer.epsilon)
        momentum = layer.momentum
        layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(
            layer.moving_variance * momentum + variance * (1.0 - momentum))
        return y

    return call


@contextlib.contextmanager
def fused_batch_norm(model):
    """While tracing: every :func:`fusable` BatchNormalization of ``model`` (nested ones
    included) computes its training forward with :func:`fused_batch_norm_train` (an
    instance attribute ``call``, removed on exit); none with ``METAMIX_TF_FUSED_BATCH_NORM=0``."""
    layers = [layer for layer in batch_norm_layers(model)
              if fusable(layer) and "call" not in vars(layer)] \
        if switched_on("METAMIX_TF_FUSED_BATCH_NORM") else []
    try:
        for layer in layers:
            layer.call = _fused_call(layer)
        yield
    finally:
        for layer in layers:
            del layer.call
