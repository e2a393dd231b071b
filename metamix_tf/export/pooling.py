"""The windows of a 'same' padded average pooling, grouped into 'valid' poolings.

A 'same' ``AveragePooling2D`` divides each window's sum by the number of *input* values in
it (the padding is not counted): 9 inside a 3x3 pooling, 6 on an edge, 4 in a corner.
TFLite's int8 AVERAGE_POOL_2D must keep its input's scale, so the int8 model would round
the mean onto the input's grid and requantize it for its reader: two roundings where the
Keras model has one. Along each axis, the output positions whose windows are clipped by the
same amounts form runs; each run pair (rows x columns) is a 'valid' pooling of one window
size over a crop of the input, which the export runs as a depthwise conv with weights
``1 / count`` (one rounding onto any output scale) and concatenates back.

Pure integer arithmetic on shapes first (:func:`axis_runs` is checked against the window
counts ``tf.nn.avg_pool`` divides by), then the Keras layers of the inference graph:
:func:`valid_pool_as_conv` and :func:`same_pool_as_convs`.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from metamix_tf.export.grids import WEIGHT_QMAX, Grid
from metamix_tf.export.layers import FOLDED_LAYERS, FakeQuant

__all__ = ["Run", "axis_runs", "window_counts", "counts_lcm", "valid_pool_as_conv",
           "same_pool_as_convs"]


@dataclasses.dataclass(frozen=True)
class Run:
    """Output positions ``[first, first + outputs)`` along one axis whose windows all hold
    ``length`` input values: a 'valid' pooling of window ``length`` and the pooling's stride
    over the input slice ``[start, stop)``."""

    first: int
    outputs: int
    start: int
    stop: int
    length: int


def _window(i: int, size: int, pool: int, stride: int, pad_before: int) -> tuple[int, int]:
    begin = i * stride - pad_before
    return max(begin, 0), min(begin + pool, size)


def axis_runs(size: int, pool: int, stride: int) -> list[Run]:
    """The runs of one axis of a 'same' pooling (TensorFlow's padding: ``ceil(size /
    stride)`` outputs, ``pad_total // 2`` before)."""
    if min(size, pool, stride) < 1:
        raise ValueError(f"size, pool and stride must be positive. Received: size={size}, "
                         f"pool={pool}, stride={stride}")
    outputs = math.ceil(size / stride)
    pad_before = max((outputs - 1) * stride + pool - size, 0) // 2
    runs: list[Run] = []
    for i in range(outputs):
        lo, hi = _window(i, size, pool, stride, pad_before)
        clip = (lo - (i * stride - pad_before), i * stride - pad_before + pool - hi)
        last = runs[-1] if runs else None
        if last is not None and last.length == hi - lo and clip == _clip(last, pool, stride,
                                                                          pad_before):
            runs[-1] = dataclasses.replace(last, outputs=last.outputs + 1, stop=hi)
        else:
            runs.append(Run(first=i, outputs=1, start=lo, stop=hi, length=hi - lo))
    return runs


def _clip(run: Run, pool: int, stride: int, pad_before: int) -> tuple[int, int]:
    begin = run.first * stride - pad_before
    return run.start - begin, begin + pool - (run.start + run.length)


def window_counts(height: int, width: int, pool: tuple, strides: tuple) -> list[int]:
    """The distinct numbers of input values per window of a 'same' pooling of an
    ``height x width`` input."""
    rows = axis_runs(height, pool[0], strides[0])
    cols = axis_runs(width, pool[1], strides[1])
    return sorted({r.length * c.length for r in rows for c in cols})


def counts_lcm(height: int, width: int, pool: tuple, strides: tuple) -> int:
    """The least common multiple of :func:`window_counts`: an output step ``s_in * k /
    lcm`` with ``k`` odd keeps every window's mean off rounding ties
    (:mod:`metamix_tf.export.pool_steps`)."""
    return math.lcm(*window_counts(height, width, pool, strides))


def _mean_conv(kernel: tuple, strides: tuple, channels: int, input_shape: tuple, native: bool,
               name: str) -> keras.layers.Layer:
    """A 'valid' depthwise conv with weights ``1 / (kh * kw)``: int8 127 at scale
    ``1 / (127 kh kw)``, exact; its output can have any scale."""
    layer = FOLDED_LAYERS["QuantDepthwiseConv2D"](
        kernel_size=kernel, strides=strides, padding="valid", use_bias=True, weight_bits=8,
        native=native, name=name)
    layer.build(input_shape)
    weight = 1.0 / (kernel[0] * kernel[1])
    layer.set_folded(np.full((*kernel, channels, 1), weight), np.zeros(channels),
                     np.full(channels, weight / WEIGHT_QMAX))
    return layer


def valid_pool_as_conv(pool: keras.layers.AveragePooling2D, input_shape: tuple,
                       native: bool, name: str) -> keras.layers.Layer:
    """A 'valid' ``AveragePooling2D`` as one depthwise conv (:func:`_mean_conv`): unlike
    TFLite's AVERAGE_POOL_2D, its output can have the scale of the Keras model's output
    quantizer."""
    return _mean_conv(tuple(pool.pool_size), tuple(pool.strides), int(input_shape[-1]),
                      tuple(input_shape), native, name)


def same_pool_as_convs(x, pool: keras.layers.AveragePooling2D, grid: Grid | None,
                       native: bool, name: str):
    """A 'same' ``AveragePooling2D`` applied to the Keras tensor ``x`` as crops, 'valid'
    mean convs (one per pair of :func:`axis_runs`) and concatenations; with ``grid``, every
    tensor a concatenation reads is rounded onto it (the pooling's output grid, which the
    caller puts on the result: the concatenations then need no requantization). Returns
    the output tensor."""
    height, width, channels = (int(d) for d in x.shape[1:])
    rows = axis_runs(height, pool.pool_size[0], pool.strides[0])
    cols = axis_runs(width, pool.pool_size[1], pool.strides[1])

    def joined(tensors: list, axis: int, suffix: str):
        if len(tensors) == 1:
            return tensors[0]
        if grid is not None:
            tensors = [FakeQuant.from_grid(grid, native=native,
                                           name=f"{name}_{suffix}{k}_quant")(t)
                       for k, t in enumerate(tensors)]
        return keras.layers.Concatenate(axis=axis, name=f"{name}_{suffix}s")(tensors)

    row_tensors = []
    for i, r in enumerate(rows):
        pieces = []
        for j, c in enumerate(cols):
            crop = keras.layers.Cropping2D(((r.start, height - r.stop), (c.start, width - c.stop)),
                                           name=f"{name}_crop{i}_{j}")(x)
            conv = _mean_conv((r.length, c.length), tuple(pool.strides), channels,
                              tuple(crop.shape), native, f"{name}_mean{i}_{j}")
            pieces.append(conv(crop))
        row_tensors.append(joined(pieces, 2, f"row{i}_piece"))
    return joined(row_tensors, 1, "row")
