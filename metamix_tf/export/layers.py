"""Keras layers of the exported inference graph.

* :class:`FakeQuant` rounds a tensor to a :class:`~metamix_tf.export.grids.Grid`. With
  ``native=True`` it is ``tf.quantization.fake_quant_with_min_max_vars`` over the grid's int8
  range followed by a ``minimum``/``maximum`` clamp to ``[qmin, qmax]`` where the int8 range
  is wider (what the TFLite converter turns into an int8 tensor and int8 MINIMUM/MAXIMUM
  ops). A grid with the saturating zero point (:func:`~metamix_tf.export.grids.activation_grid`)
  needs no ``minimum``: the int8 op that writes the tensor saturates at ``qmax``. With
  ``relu=True`` (unsigned grids) no ``maximum`` either: a ReLU gives the bottom 0, the one
  of the op that computes the input (the converter fuses it into the conv, its int8
  activation clamp at the zero point), or for ``requantize`` one fused into the identity
  convolution. ``requantize=True`` is for an input that is already int8 (on a finer grid):
  clamp first, then an identity
  1x1 depthwise convolution (weights 1) before the fake quant, so that the rescaling runs
  as a convolution's requantization, which LiteRT's kernels compute exactly (its QUANTIZE
  op rounds int8 -> int8 rescales with a low-precision multiplier). ``identity_weight`` /
  ``identity_bias`` set that conv's int8 weight (scale ``1 / identity_weight``) and its
  bias, a :class:`~metamix_tf.export.grids.Shift` of a signed grid. With ``native=False``
  it is plain float math, ``clip(floor(x / scale + 0.5), qmin, qmax) * scale``, for
  float32 / float16 models (GPU delegates run FLOOR, MUL, MINIMUM, MAXIMUM).
* :class:`FoldedConv2D`, :class:`FoldedDepthwiseConv2D`, :class:`FoldedDense`: the stock
  layers with BatchNorm folded in and a kernel on a per-output-channel integer grid
  (``kernel = integers * kernel_scale``). ``native=True`` passes the kernel through
  ``fake_quant_with_min_max_vars_per_channel`` (narrow range, ``[-127, 127] * scale``) so
  that the converter stores int8 weights with exactly those scales; the dense layer then
  runs as a 1x1 convolution (the converter cannot keep per-channel scales through the
  transpose a fully connected op needs).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.export.grids import WEIGHT_QMAX, Grid

__all__ = ["FakeQuant", "FoldedConv2D", "FoldedDepthwiseConv2D", "FoldedDense", "FOLDED_LAYERS"]

_PACKAGE = "metamix_tf.export"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FakeQuant(keras.layers.Layer):
    """Rounds to ``q * scale`` with ``q`` in ``[qmin, qmax]`` (int8 zero point
    ``zero_point``); see the module docstring for ``native``, ``requantize`` and ``relu``
    (without ``requantize``, ``relu=True`` promises an input >= 0: it comes from a ReLU).

    Rounding is half-up (``floor(x / scale + 0.5)``), as TensorFlow's FakeQuant kernels do.
    """

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, bits: int = 8,
                 signed: bool = True, requantize: bool = False, native: bool = True,
                 relu: bool = False, identity_weight: int = WEIGHT_QMAX,
                 identity_bias: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.grid = Grid(scale=float(scale), zero_point=int(zero_point), qmin=int(qmin),
                         qmax=int(qmax), bits=int(bits), signed=bool(signed))
        if relu and self.grid.qmin != 0:
            raise ValueError(f"FakeQuant '{self.name}': a ReLU gives the bottom of unsigned "
                             f"grids only (qmin 0). Received: relu={relu}, qmin={qmin}")
        self.requantize = bool(requantize)
        self.native = bool(native)
        self.relu = bool(relu)
        self.identity_weight = int(identity_weight)
        self.identity_bias = float(identity_bias)

    @classmethod
    def from_grid(cls, grid: Grid, **kwargs) -> FakeQuant:
        return cls(**grid.to_dict(), **kwargs)

    def _clamp(self, x):
        g = self.grid
        if g.qmax < g.int8_max:
            x = tf.minimum(x, np.float32(g.qmax * g.scale))
        if g.qmin > g.int8_min and not self.relu:
            x = tf.maximum(x, np.float32(g.qmin * g.scale))
        return x

    def call(self, inputs):
        g = self.grid
        x = tf.cast(inputs, tf.float32)
        if not self.native:
            q = tf.floor(x * np.float32(1.0 / g.scale) + np.float32(0.5))
            q = tf.clip_by_value(q, np.float32(g.qmin), np.float32(g.qmax))
            return q * np.float32(g.scale)
        if not g.fits_int8:  # wider than 8 bits: the grid itself, no int8 form
            return tf.quantization.fake_quant_with_min_max_vars(
                x, np.float32(g.qmin * g.scale), np.float32(g.qmax * g.scale), num_bits=g.bits)
        if self.requantize:
            x = _identity_conv(self._clamp(x), relu=self.relu, weight=self.identity_weight,
                               bias=self.identity_bias)
        x = tf.quantization.fake_quant_with_min_max_vars(
            x, np.float32(g.int8_min * g.scale), np.float32(g.int8_max * g.scale), num_bits=8)
        if not self.requantize:
            x = self._clamp(x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(self.grid.to_dict(), requantize=self.requantize, native=self.native,
                      relu=self.relu, identity_weight=self.identity_weight,
                      identity_bias=self.identity_bias)
        return config


def _fake_quant_channels(kernel, scale: np.ndarray, channels_shape):
    """Per-channel int8 fake quant of ``kernel`` reshaped to ``channels_shape`` (channels
    last; the result keeps that shape: the converter cannot move a per-channel axis).

    ``scale`` is a NumPy array: the converter reads the bounds only as constants.
    """
    bound = (WEIGHT_QMAX * np.asarray(scale, np.float64)).astype(np.float32)
    view = tf.reshape(kernel, channels_shape)
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        view, tf.constant(-bound), tf.constant(bound), num_bits=8, narrow_range=True)


def _identity_conv(x, relu: bool = False, weight: int = WEIGHT_QMAX, bias: float = 0.0):
    """``x`` through a 1x1 depthwise convolution with int8 weights ``weight`` at scale
    ``1 / weight`` and bias ``bias`` (and a ReLU; the converter fuses both into it)."""
    channels = int(x.shape[-1])
    kernel = _fake_quant_channels(np.ones(channels, np.float32),
                                  np.full(channels, 1.0 / weight), [1, 1, 1, channels])
    kernel = tf.reshape(kernel, [1, 1, channels, 1])
    x4 = x if x.shape.rank == 4 else tf.reshape(x, [-1, 1, 1, channels])
    y = tf.nn.depthwise_conv2d(x4, kernel, [1, 1, 1, 1], "VALID")
    if bias:
        y = tf.nn.bias_add(y, np.full(channels, bias, np.float32))
    if relu:
        y = tf.nn.relu(y)
    return y if x.shape.rank == 4 else tf.reshape(y, tf.shape(x))


class _FoldedMixin:
    """The per-channel ``kernel_scale`` variable, the integer view and the config, in front
    of a stock layer class (``class FoldedX(_FoldedMixin, keras.layers.X)``)."""

    def __init__(self, *args, weight_bits: int = 8, native: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_bits = int(weight_bits)
        self.native = bool(native)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_scale()

    def get_config(self):
        config = super().get_config()
        config.update(weight_bits=self.weight_bits, native=self.native)
        return config

    @property
    def channels(self) -> int:
        return int(np.prod(self.kernel.shape[self._channel_start:]))

    def _build_scale(self):
        self.kernel_scale = self.add_weight(
            name="kernel_scale", shape=(self.channels,), initializer="ones", trainable=False)
        self._scale_value = np.ones(self.channels, np.float32)

    def set_folded(self, kernel, bias, scale) -> None:
        """Assigns the folded kernel, bias and per-channel scales (call it eagerly).

        The scales are also kept as a NumPy array, the constant the converter needs for the
        per-channel fake quant; assign them only through this method.
        """
        self.kernel.assign(np.asarray(kernel, np.float32))
        self.bias.assign(np.asarray(bias, np.float32))
        self.kernel_scale.assign(np.asarray(scale, np.float32))
        self._scale_value = np.asarray(scale, np.float32)

    def kernel_integers(self) -> np.ndarray:
        """``round(kernel / kernel_scale)`` as int32 (channels over the trailing axes)."""
        kernel = keras.ops.convert_to_numpy(self.kernel).astype(np.float64)
        scale = keras.ops.convert_to_numpy(self.kernel_scale).astype(np.float64)
        flat = np.round(kernel.reshape(-1, scale.size) / scale)
        return flat.reshape(kernel.shape).astype(np.int32)

    # The stock layers disagree on what they save (Conv2D: kernel and bias only); save the
    # same three variables for all of them.
    def _own_variables(self) -> list:
        return [self.kernel] + ([self.bias] if self.use_bias else []) + [self.kernel_scale]

    def save_own_variables(self, store):
        if self.built:
            for i, variable in enumerate(self._own_variables()):
                store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._own_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(f"Layer '{self.name}' expects {len(variables)} saved variables. "
                             f"Received: variables={len(store.keys())}")
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])
        self._scale_value = keras.ops.convert_to_numpy(self.kernel_scale)

    def _finish(self, outputs):
        if self.use_bias:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FoldedConv2D(_FoldedMixin, keras.layers.Conv2D):
    """``Conv2D`` whose kernel is ``integers * kernel_scale`` per output channel."""

    _channel_start = 3

    def call(self, inputs):
        kernel = self.kernel
        if self.native:
            kernel = _fake_quant_channels(kernel, self._scale_value, self.kernel.shape)
        return self._finish(self.convolution_op(inputs, kernel))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FoldedDepthwiseConv2D(_FoldedMixin, keras.layers.DepthwiseConv2D):
    """``DepthwiseConv2D`` whose kernel ``[kh, kw, cin, m]`` is ``integers * kernel_scale``
    with one scale per output channel ``cin * m`` (TFLite's ``[1, kh, kw, cin * m]``)."""

    _channel_start = 2

    def call(self, inputs):
        kernel = self.kernel
        if self.native:
            kh, kw = self.kernel.shape[:2]
            kernel = _fake_quant_channels(kernel, self._scale_value, [kh, kw, 1, self.channels])
            kernel = tf.reshape(kernel, self.kernel.shape)
        outputs = keras.ops.depthwise_conv(
            inputs, kernel, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format)
        return self._finish(outputs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FoldedDense(_FoldedMixin, keras.layers.Dense):
    """``Dense`` whose kernel ``[in, out]`` is ``integers * kernel_scale`` per output unit.

    ``native=True`` computes it as a 1x1 convolution (a rank-2 input as ``[batch, 1, 1,
    in]``, a rank-4 one, ConvNeXt's pointwise layers, as it is), which the converter keeps
    with per-channel int8 weights.
    """

    _channel_start = 1

    def call(self, inputs):
        if not self.native:
            return self._finish(tf.matmul(inputs, self.kernel))
        if inputs.shape.rank not in (2, 4):
            raise ValueError(f"FoldedDense '{self.name}' exports rank-2 and rank-4 inputs "
                             f"only. Received: input_shape={tuple(inputs.shape)}")
        units_in, units = self.kernel.shape
        kernel = _fake_quant_channels(self.kernel, self._scale_value, [1, 1, units_in, units])
        x = inputs if inputs.shape.rank == 4 else tf.reshape(inputs, [-1, 1, 1, units_in])
        outputs = tf.nn.conv2d(x, kernel, strides=1, padding="VALID")
        return self._finish(outputs if inputs.shape.rank == 4 else
                            tf.reshape(outputs, [-1, units]))


# Quantized layer class name -> folded inference class.
FOLDED_LAYERS = {
    "QuantConv2D": FoldedConv2D,
    "QuantDepthwiseConv2D": FoldedDepthwiseConv2D,
    "QuantDense": FoldedDense,
}
