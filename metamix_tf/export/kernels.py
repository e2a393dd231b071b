"""The integer arithmetic of LiteRT's default CPU kernels (XNNPACK) for the int8 ops that
write a stored tensor, as numpy functions of the int8 integers and the file's scales.

These are the values an int8 model computes, bit for bit (tested against one-op LiteRT
models in ``tests/export/test_kernels.py``); a Keras model that should agree with the int8
model on every input has to compute them, not the exact real-number results:

* :func:`conv_requantize` (CONV_2D; XNNPACK's depthwise and fully connected kernels use
  the same float32 requantization, not tested here): the int32
  accumulator (products plus bias) times a float32 scale ``s_in * s_w[c] / s_out``, rounded
  half to even: ``q = rint(float32(acc) * scale[c]) + z_out``, clamped to int8. A rounding
  tie goes to the even integer, as in ``tf.round``.
* :func:`add` (ADD): fixed-point, ``q = (2^(n-1) + m_a (q_a - z_a) + m_b (q_b - z_b)) >> n
  + z_out`` with 21-bit multipliers ``m = rint(float32(s / s_out) * 2^n)``. A tie goes up
  (``floor(x + 1/2)``), and the multipliers are ``s / s_out`` to about 2^-21, so the result
  can differ by one from rounding the exact sum ``s_a q_a + s_b q_b`` near a tie (16 of the
  65,536 input pairs for one of the tests' scale triples, none for others): no float
  computation of the sum, float32 or float64, reproduces it there.
* :func:`mean_requantize` (MEAN, a global average pooling): the sum of the input integers
  times :func:`mean_scale` in float32, plus the output zero point *before* rounding half
  to even (so an odd zero point moves which ties go up).
* :func:`quantize` (QUANTIZE, a float input to int8): ``rint(float32(x * float32(1 /
  s))) + z``, a multiplication by the reciprocal, not a division.

An op XNNPACK does not take runs on LiteRT's builtin kernels instead: a CONV_2D or
DEPTHWISE_CONV_2D with an INT4 filter (:mod:`metamix_tf.export.int4`) does. Those requantize
in fixed point (:func:`builtin_conv_requantize`), rounding other values than XNNPACK's
float32 (tested the same way, on int8 filters: the builtin kernels read an INT4 filter as its
int8 values). Measured on LiteRT 2.3's x86-64 wheel; other builds (ARM, or TFLite compiled
with single rounding) may round the builtin kernels' ties otherwise, and the tests say so
by failing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["AddParams", "add_params", "add", "conv_scale", "conv_requantize", "mean_scale",
           "mean_requantize", "quantize", "quantize_multiplier", "builtin_conv_params",
           "builtin_conv_requantize"]

_INT8 = (-128, 127)


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


@dataclasses.dataclass(frozen=True)
class AddParams:
    """Fixed-point form of an int8 ADD: ``multiplier_a``, ``multiplier_b`` (signed, at most
    2^21) and the right ``shift`` (12 to 30)."""

    multiplier_a: int
    multiplier_b: int
    shift: int


def add_params(scale_a: float, scale_b: float, scale_out: float) -> AddParams:
    """The multipliers and shift XNNPACK derives from the three tensor scales: the ratios
    ``float32(s / s_out)``, a shift that puts the larger one in ``[2^20, 2^21)``, and each
    multiplier that ratio times ``2^shift`` rounded half to even."""
    ratio_a = _f32(scale_a) / _f32(scale_out)
    ratio_b = _f32(scale_b) / _f32(scale_out)
    largest = max(abs(ratio_a), abs(ratio_b))
    exponent = int(np.frexp(largest)[1]) - 1  # floor(log2), exact for a float32
    shift = 20 - exponent
    if not 12 <= shift <= 30:
        raise ValueError(f"ADD scale ratios {float(ratio_a):.6g}, {float(ratio_b):.6g} are "
                         "outside the range int8 ADD kernels accept ([2^-10, 2^8))")

    def multiplier(ratio):
        m = int(np.rint(_f32(abs(ratio)) * _f32(2.0 ** shift)))
        return -m if ratio < 0 else m

    return AddParams(multiplier(ratio_a), multiplier(ratio_b), shift)


def add(q_a, q_b, zero_points: tuple[int, int, int], params: AddParams,
        out_range: tuple[int, int] = _INT8) -> np.ndarray:
    """Int8 ADD of integer arrays ``q_a``, ``q_b`` (stored values, zero points included):
    ``zero_points`` is ``(z_a, z_b, z_out)``; ``out_range`` the clamp of the stored output
    (int8, or narrower for a fused ReLU)."""
    z_a, z_b, z_out = zero_points
    acc = ((1 << (params.shift - 1))
           + params.multiplier_a * (np.asarray(q_a, np.int64) - z_a)
           + params.multiplier_b * (np.asarray(q_b, np.int64) - z_b))
    return np.clip((acc >> params.shift) + z_out, *out_range)


def conv_scale(input_scale: float, weight_scales, output_scale: float) -> np.ndarray:
    """Per-output-channel float32 requantization scale ``(s_in * s_w[c]) / s_out``."""
    return (_f32(input_scale) * _f32(weight_scales)) / _f32(output_scale)


def conv_requantize(acc, scale, zero_point: int,
                    out_range: tuple[int, int] = _INT8) -> np.ndarray:
    """Int8 output of a conv / depthwise conv / fully connected from its int32 accumulator
    ``acc`` (input integers minus their zero point times weight integers, summed, plus the
    int32 bias; channels last) and :func:`conv_scale` ``scale``."""
    scaled = _f32(np.asarray(acc, np.int64).astype(np.float32) * _f32(scale))
    return np.clip(np.rint(scaled).astype(np.int64) + zero_point, *out_range)


def mean_scale(input_scale: float, output_scale: float, count: int) -> np.float32:
    """Float32 requantization scale ``s_in / (s_out n)`` of an int8 MEAN over ``n`` values."""
    return _f32(input_scale) / (_f32(output_scale) * _f32(count))


def mean_requantize(total, scale, zero_point: int,
                    out_range: tuple[int, int] = _INT8) -> np.ndarray:
    """Int8 output of a MEAN from the sum ``total`` of its input integers (minus their zero
    point): ``rint(float32(float32(total) * scale) + zero_point)``, clamped."""
    scaled = _f32(np.asarray(total, np.int64).astype(np.float32) * _f32(scale))
    return np.clip(np.rint(_f32(scaled + _f32(zero_point))).astype(np.int64), *out_range)


def quantize(x, scale: float, zero_point: int, out_range: tuple[int, int] = _INT8) -> np.ndarray:
    """Int8 output of a QUANTIZE of float32 ``x``: ``rint(float32(x * float32(1 / s))) + z``,
    clamped."""
    reciprocal = _f32(1.0) / _f32(scale)
    scaled = _f32(_f32(x) * reciprocal)
    return np.clip(np.rint(scaled).astype(np.int64) + zero_point, *out_range)


def quantize_multiplier(multiplier: float) -> tuple[int, int]:
    """LiteRT's fixed-point form ``(M, shift)`` of a positive real ``multiplier = M 2^shift /
    2^31``: ``frexp`` gives ``multiplier = f 2^shift`` with ``f`` in ``[1/2, 1)``, ``M =
    round(f 2^31)`` (half away from zero; ``M = 2^31`` becomes ``2^30`` and ``shift + 1``);
    below ``2^-31`` both are 0."""
    fraction, shift = np.frexp(np.float64(multiplier))
    m = int(np.floor(fraction * 2.0 ** 31 + 0.5))
    if m == 1 << 31:
        m, shift = m // 2, shift + 1
    if shift < -31:
        return 0, 0
    return m, int(shift)


def builtin_conv_params(input_scale: float, weight_scales, output_scale: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel ``(multipliers, shifts)`` of a builtin CONV_2D / DEPTHWISE_CONV_2D:
    :func:`quantize_multiplier` of ``s_in * s_w[c] / s_out`` computed in float64 from the
    float32 scales."""
    real = (np.float64(_f32(input_scale)) * _f32(weight_scales).astype(np.float64)
            / np.float64(_f32(output_scale)))
    pairs = [quantize_multiplier(m) for m in np.atleast_1d(real)]
    return (np.array([m for m, _ in pairs], np.int64), np.array([s for _, s in pairs], np.int64))


def builtin_conv_requantize(acc, multipliers, shifts, zero_point: int,
                            out_range: tuple[int, int] = _INT8) -> np.ndarray:
    """Int8 output of a builtin CONV_2D / DEPTHWISE_CONV_2D from its int32 accumulator (as
    :func:`conv_requantize`): two roundings half up, ``t = (A 2^max(shift, 0) M + 2^30) >>
    31`` then ``(t + 2^(r - 1)) >> r`` with ``r = max(-shift, 0)``, plus ``z_out``, clamped.
    The first rounding moves some values just below a half up across it (``0.375`` of a
    unit rounds to 1 when ``r = 2``)."""
    shifts = np.asarray(shifts, np.int64)
    left, right = np.maximum(shifts, 0), np.maximum(-shifts, 0)
    t = ((np.asarray(acc, np.int64) << left) * np.asarray(multipliers, np.int64)
         + (1 << 30)) >> 31
    rounded = (t + ((1 << right) >> 1)) >> right
    return np.clip(rounded + zero_point, *out_range)
