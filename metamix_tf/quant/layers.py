"""Quantized versions of the stock Keras Conv2D, DepthwiseConv2D and Dense layers.

Each keeps its parent's exact signature and adds two arguments: ``input_quantizer`` (an
:class:`~metamix_tf.quant.quantizers.ActivationQuantizer` applied to the layer's input) and
``kernel_quantizer`` (a :class:`~metamix_tf.quant.quantizers.WeightQuantizer` applied to the
kernel). Both accept a layer, its serialized dict, or None (no quantization).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops as kops

from metamix_tf.quant import ops
from metamix_tf.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["QuantConv2D", "QuantDepthwiseConv2D", "QuantDense", "QuantAdd", "QUANT_LAYERS",
           "QuantLayerMixin"]


def _as_layer(value, cls):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        layer = keras.saving.deserialize_keras_object(value)
        if not isinstance(layer, cls):
            raise ValueError(f"Expected a serialized {cls.__name__}. Received: {value!r}")
        return layer
    raise ValueError(f"Expected a {cls.__name__}, its config dict or None. Received: {value!r}")


class QuantLayerMixin:
    """Shared plumbing: the two quantizers, their build and their serialization."""

    channel_axes = 1

    def _init_quantizers(self, input_quantizer, kernel_quantizer):
        self.input_quantizer = _as_layer(input_quantizer, ActivationQuantizer)
        self.kernel_quantizer = _as_layer(kernel_quantizer, WeightQuantizer)

    def _build_quantizers(self, input_shape):
        if self.input_quantizer is not None and not self.input_quantizer.built:
            self.input_quantizer.build(input_shape)
        if self.kernel_quantizer is not None and not self.kernel_quantizer.built:
            self.kernel_quantizer.build(self.kernel.shape)

    def _quantized_linear(self, inputs, linear):
        """``linear(input_quantizer(inputs), kernel_quantizer(kernel))``, ``linear`` the
        layer's convolution or matmul. Where ``inputs`` takes no gradient (the model's input)
        and the input quantizer runs one branch on the native kernels, the two run as
        :func:`~metamix_tf.quant.ops.lsq_linear` (the same values; the step size's gradient
        without ``linear``'s input gradient)."""
        kernel = self.kernel
        if self.kernel_quantizer is not None:
            kernel = self.kernel_quantizer(kernel)
        quantizer = self.input_quantizer
        if quantizer is None:
            return linear(inputs, kernel)
        # the walk back first: single_branch builds the branch's ops, unread on other layers
        branch = quantizer.single_branch(inputs) if ops.takes_no_gradient(inputs) else None
        if branch is not None:
            return ops.lsq_linear(inputs, *branch, kernel, linear)
        return linear(quantizer(inputs), kernel)

    def _quantizer_config(self, config):
        config.update(
            input_quantizer=None if self.input_quantizer is None
            else keras.saving.serialize_keras_object(self.input_quantizer),
            kernel_quantizer=None if self.kernel_quantizer is None
            else keras.saving.serialize_keras_object(self.kernel_quantizer))
        return config

    def _add_bias_and_activate(self, outputs):
        if self.use_bias:
            outputs = kops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="metamix_tf")
class QuantConv2D(QuantLayerMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose input and kernel pass through quantizers first.

    The arguments are ``keras.layers.Conv2D``'s, in the same order with the same defaults,
    plus ``input_quantizer`` and ``kernel_quantizer``.
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid",
                 data_format=None, dilation_rate=(1, 1), groups=1, activation=None,
                 use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, input_quantizer=None,
                 kernel_quantizer=None, **kwargs):
        super().__init__(
            filters=filters, kernel_size=kernel_size, strides=strides, padding=padding,
            data_format=data_format, dilation_rate=dilation_rate, groups=groups,
            activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer, kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer, activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint, bias_constraint=bias_constraint, **kwargs)
        self._init_quantizers(input_quantizer, kernel_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs):
        return self._add_bias_and_activate(self._quantized_linear(inputs, self.convolution_op))

    def get_config(self):
        return self._quantizer_config(super().get_config())


@keras.saving.register_keras_serializable(package="metamix_tf")
class QuantDepthwiseConv2D(QuantLayerMixin, keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` whose input and kernel pass through quantizers.

    The arguments are ``keras.layers.DepthwiseConv2D``'s, in the same order with the same
    defaults, plus ``input_quantizer`` and ``kernel_quantizer``.
    """

    channel_axes = 2

    def __init__(self, kernel_size, strides=(1, 1), padding="valid", depth_multiplier=1,
                 data_format=None, dilation_rate=(1, 1), activation=None, use_bias=True,
                 depthwise_initializer="glorot_uniform", bias_initializer="zeros",
                 depthwise_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 depthwise_constraint=None, bias_constraint=None, input_quantizer=None,
                 kernel_quantizer=None, **kwargs):
        super().__init__(
            kernel_size=kernel_size, strides=strides, padding=padding,
            depth_multiplier=depth_multiplier, data_format=data_format,
            dilation_rate=dilation_rate, activation=activation, use_bias=use_bias,
            depthwise_initializer=depthwise_initializer, bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint, bias_constraint=bias_constraint,
            **kwargs)
        self._init_quantizers(input_quantizer, kernel_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs):
        return self._add_bias_and_activate(self._quantized_linear(inputs, self._depthwise))

    def _depthwise(self, x, kernel):
        return kops.depthwise_conv(x, kernel, strides=self.strides, padding=self.padding,
                                   dilation_rate=self.dilation_rate,
                                   data_format=self.data_format)

    def get_config(self):
        return self._quantizer_config(super().get_config())


@keras.saving.register_keras_serializable(package="metamix_tf")
class QuantDense(QuantLayerMixin, keras.layers.Dense):
    """``keras.layers.Dense`` whose input and kernel pass through quantizers first.

    The arguments are ``keras.layers.Dense``'s, in the same order with the same defaults,
    plus ``input_quantizer`` and ``kernel_quantizer``.
    """

    def __init__(self, units, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, lora_rank=None, lora_alpha=None,
                 quantization_config=None, input_quantizer=None, kernel_quantizer=None,
                 **kwargs):
        if quantization_config is not None:  # a Keras >= 3.12 argument; older ones lack it
            kwargs["quantization_config"] = quantization_config
        super().__init__(
            units=units, activation=activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer, kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint, lora_rank=lora_rank, lora_alpha=lora_alpha,
            **kwargs)
        self._init_quantizers(input_quantizer, kernel_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        return self._add_bias_and_activate(self._quantized_linear(inputs, kops.matmul))

    def get_config(self):
        return self._quantizer_config(super().get_config())


@keras.saving.register_keras_serializable(package="metamix_tf")
class QuantAdd(keras.layers.Add):
    """``keras.layers.Add`` that, with ``kernel_rounding`` set, adds two inputs at inference
    as LiteRT's int8 ADD kernel does (:func:`metamix_tf.quant.ops.fixed_point_add`): its
    21-bit multipliers put a few sums on the other side of a rounding boundary from the
    exact sum. ``kernel_rounding``: ``{"steps": [s_a, s_b], "multipliers": [m_a, m_b],
    "shift": k, "output_step": s_out}`` (set by
    ``metamix_tf.export.kernel_rounding.set_kernel_rounding``), used only while both inputs
    are on those grids; otherwise, in training and without it, the float sum."""

    def __init__(self, kernel_rounding: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.kernel_rounding = kernel_rounding

    def call(self, inputs, training=None):
        total = super().call(inputs)
        rounding = self.kernel_rounding
        if rounding is None or training or len(inputs) != 2:
            return total
        steps = rounding["steps"]
        exact = ops.fixed_point_add(inputs[0], inputs[1], steps, rounding["multipliers"],
                                    rounding["shift"], rounding["output_step"])
        on_grids = tf.reduce_all([
            tf.reduce_all(tf.abs(x / step - tf.round(x / step)) < 1e-3)
            for x, step in zip(inputs, (np.float32(s) for s in steps), strict=True)])
        return tf.where(on_grids, exact, total)

    def get_config(self):
        return {**super().get_config(), "kernel_rounding": self.kernel_rounding}


# Stock layer type -> quantized counterpart, most specific first.
QUANT_LAYERS = (
    (keras.layers.DepthwiseConv2D, QuantDepthwiseConv2D),
    (keras.layers.Conv2D, QuantConv2D),
    (keras.layers.Dense, QuantDense),
)
