"""Pure functions for export: quantization grids, their int8 encodings, and BatchNorm folding.

Conventions. A quantized tensor holds values ``q * scale`` with integers ``q`` in
``[qmin, qmax]``; TFLite stores ``q + zero_point`` in an int8, so the int8 range limits
``q`` to ``[-128 - zero_point, 127 - zero_point]``. A b-bit activation grid of MetaMix (LSQ
step ``s``) is ``scale = s`` with ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`` (signed) or
``[0, 2^b - 1]`` (unsigned): every b <= 8 fits an int8 exactly, the b-bit bounds being a
clamp inside the int8 range. Its zero point is ``127 - qmax`` ("saturating": the int8
saturation of the op that writes the tensor is the b-bit top, so only the bottom may need a
clamp op, and none after a ReLU, see :mod:`metamix_tf.export.layers`): 0 for signed and
-128 for unsigned 8-bit grids, 112 for unsigned 4-bit ones (int8 range ``[-240, 15]``
steps). ``saturate=False`` gives the earlier zero points, 0 (signed) and -128 (unsigned),
with a clamp op at each b-bit bound inside the int8 range.

MetaMix activations live in the fake-quantized Keras model as ``round(clip(x / s))``; an int8
TFLite model reproduces such a tensor exactly when its int8 scale is ``s`` and its clamp is
the b-bit range, whatever b is.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from metamix_tf.quant import ops

__all__ = [
    "INT8_MIN",
    "INT8_MAX",
    "WEIGHT_QMAX",
    "Grid",
    "activation_grid",
    "calibrated_grid",
    "shared_grid",
    "is_exact_requantization",
    "Shift",
    "shifted_requantization",
    "FoldedWeights",
    "fold_batch_norm",
    "batch_norm_factor",
    "folded_scale",
    "spread_multiplier",
    "spread_multiplier_for_bias",
    "spread_to_int8",
    "kernel_integers",
]

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_QMAX = 127  # int8 per-channel weights are symmetric: [-127, 127], zero point 0


@dataclasses.dataclass(frozen=True)
class Grid:
    """A quantization grid ``q * scale``, ``q`` in ``[qmin, qmax]``, stored in an int8 with
    ``zero_point``.

    ``bits``: the bit-width the grid stands for (8 for calibrated tensors); ``signed``: the
    grid has negative values.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int
    signed: bool

    def __post_init__(self):
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"A grid needs a positive finite scale. Received: scale={self.scale}")
        if self.qmin > self.qmax:
            raise ValueError(f"A grid needs qmin <= qmax. Received: qmin={self.qmin}, "
                             f"qmax={self.qmax}")

    @property
    def fits_int8(self) -> bool:
        """Whether an int8 with this zero point holds every ``q`` in ``[qmin, qmax]``."""
        return INT8_MIN - self.zero_point <= self.qmin and self.qmax <= INT8_MAX - self.zero_point

    @property
    def int8_min(self) -> int:
        """Smallest ``q`` the int8 storage can hold."""
        return INT8_MIN - self.zero_point

    @property
    def int8_max(self) -> int:
        """Largest ``q`` the int8 storage can hold."""
        return INT8_MAX - self.zero_point

    @property
    def clamped(self) -> bool:
        """Whether ``[qmin, qmax]`` is narrower than the int8 range (needs a clamp: an op,
        or the ReLU before the tensor for the bottom of an unsigned grid)."""
        return self.qmin > self.int8_min or self.qmax < self.int8_max

    @property
    def min_value(self) -> float:
        return self.qmin * self.scale

    @property
    def max_value(self) -> float:
        return self.qmax * self.scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation_grid(bits: int, signed: bool, step: float, saturate: bool = True) -> Grid:
    """The grid of a b-bit LSQ activation quantizer with step ``step``.

    Signed: ``[-2^(b-1), 2^(b-1) - 1]``; unsigned: ``[0, 2^b - 1]``. Int8 zero point
    ``127 - qmax`` (``saturate``: the int8 top is the grid's top, module docstring), else 0
    (signed) / -128 (unsigned); both agree at 8 bits. Grids of 2 to 8 bits fit an int8
    (:attr:`Grid.fits_int8`); wider ones only run in float exports.
    """
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"Activation bit-widths lie in [2, 16]. Received: bits={bits}")
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"An activation step size must be positive and finite. Received: "
                         f"step={step}")
    qn, qp = ops.quant_range(int(bits), bool(signed))
    zero_point = 0 if signed else INT8_MIN
    if saturate and int(bits) <= 8:
        zero_point = INT8_MAX - qp
    return Grid(scale=float(step), zero_point=zero_point, qmin=-qn, qmax=qp, bits=int(bits),
                signed=bool(signed))


def calibrated_grid(low: float, high: float) -> Grid:
    """8-bit asymmetric grid over ``[min(low, 0), max(high, 0)]`` (the range widened to hold
    zero exactly), nudged like ``tf.quantization.fake_quant_with_min_max_vars``."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"A calibrated range must be finite. Received: range=({low}, {high})")
    if high - low < 1e-8:
        high = low + 1e-8
    scale = (high - low) / 255.0
    zero_u8 = int(np.clip(np.round(-low / scale), 0, 255))
    return Grid(scale=scale, zero_point=zero_u8 + INT8_MIN, qmin=-zero_u8, qmax=255 - zero_u8,
                bits=8, signed=zero_u8 > 0)


def shared_grid(primary: Grid, others: tuple = (), max_abs: float | None = None,
                signed: bool = False) -> tuple[Grid, int]:
    """The int8 grid of a tensor read by several quantizers and/or float ops.

    Returns ``(grid, k)`` with ``grid.scale = primary.scale / k`` for the largest odd ``k``
    such that the int8 range still covers ``primary``'s range, each grid in ``others`` and
    ``[-max_abs, max_abs]`` (``k = 1`` when nothing larger fits). With an odd ``k``,
    requantizing this grid to ``primary``'s rounds exactly as quantizing the float value
    directly would: ``round(round(x k / s) / k) = round(x / s)`` because ``q / k`` is never
    half-way between two integers. The grid is signed (zero point 0) if ``signed`` or any
    of the quantizer grids is, else unsigned (zero point -128).
    """
    grids = (primary, *others)
    signed = bool(signed) or any(g.signed for g in grids)
    top = INT8_MAX if signed else INT8_MAX - INT8_MIN
    bottom = -INT8_MIN if signed else 0
    limits = []
    for g in grids:
        if g.max_value > 0:
            limits.append(top * primary.scale / g.max_value)
        if g.min_value < 0:  # only signed grids reach here
            limits.append(bottom * primary.scale / -g.min_value)
    if max_abs is not None and max_abs > 0:
        limits.append(top * primary.scale / max_abs)
    k_max = min(limits) if limits else 1.0
    k = max(1, int(math.floor(k_max + 1e-9)))
    if k % 2 == 0:
        k -= 1
    scale = primary.scale / k
    zero_point = 0 if signed else INT8_MIN
    qmin, qmax = (INT8_MIN, INT8_MAX) if signed else (0, top)
    return Grid(scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax, bits=8,
                signed=signed), k


def is_exact_requantization(source: Grid, target: Grid) -> bool:
    """Whether rounding ``source`` values to ``target`` equals rounding the float directly:
    ``target.scale`` is an odd multiple of ``source.scale`` (or the same) and ``source``'s
    range covers ``target``'s."""
    ratio = target.scale / source.scale
    k = round(ratio)
    return (abs(ratio - k) < 1e-5 * max(k, 1) and k % 2 == 1
            and source.int8_min * source.scale <= target.min_value + 1e-12 * target.scale
            and source.int8_max * source.scale >= target.max_value - 1e-12 * target.scale)


@dataclasses.dataclass(frozen=True)
class Shift:
    """A requantization that adds ``steps`` target steps: a 1x1 identity conv with int8
    weight ``weight`` (scale ``1 / weight``) and int32 bias ``bias`` (units of
    ``source.scale / weight``), a ReLU fused in. For a signed b-bit target, ``steps =
    2^(b-1)`` turns it into an unsigned one whose bottom is the ReLU and whose top is the
    int8 saturation (:meth:`grid`); the reader's bias subtracts the shift."""

    steps: int
    weight: int
    bias: int

    def grid(self, target: Grid) -> Grid:
        """``target`` holding ``q + steps``: what the int8 tensor stores."""
        return Grid(scale=target.scale, zero_point=target.zero_point - self.steps,
                    qmin=target.qmin + self.steps, qmax=target.qmax + self.steps,
                    bits=target.bits, signed=False)


def shifted_requantization(source: Grid, target: Grid, margin: float = 2e-4) -> Shift | None:
    """The :class:`Shift` of ``-target.qmin`` steps from ``source`` to signed ``target``, or
    None where none is provably exact.

    The int8 conv computes ``round(n r + bias r / weight)`` for each int8 value ``n`` of
    ``source`` (``r = source.scale / target.scale``), i.e. ``round(n r) + steps`` up to
    ``e = bias r / weight - steps`` (the int32 bias cannot hold ``steps / r`` exactly). The
    weight in ``[1, 127]`` with the smallest ``|e|`` is kept if every ``n r`` lies more than
    ``|e| + margin`` from a rounding boundary (``margin`` covers the kernels' float32 and
    fixed-point multipliers); then the shift moves no rounding.
    """
    steps = -int(target.qmin)
    if steps <= 0:
        return None
    r = source.scale / target.scale
    biases = {weight: int(round(steps * weight / r)) for weight in range(WEIGHT_QMAX, 0, -1)}
    error_of = {w: abs(b * r / w - steps) for w, b in biases.items()}
    weight = min(error_of, key=error_of.get)  # the first (largest) weight on a tie
    error, bias = error_of[weight], biases[weight]
    n = np.arange(source.int8_min, source.int8_max + 1, dtype=np.float64)
    distance = np.abs(np.mod(n * r, 1.0) - 0.5)
    if float(distance.min()) <= error + margin:
        return None
    return Shift(steps=steps, weight=weight, bias=bias)


def kernel_integers(quantized_kernel: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The integers ``round(W_q / s)`` of a fake-quantized kernel (``step`` broadcasts
    against the trailing axes), as float64 values; raises if ``W_q`` is off its grid."""
    quantized_kernel = np.asarray(quantized_kernel, np.float64)
    step = np.asarray(step, np.float64)
    ratio = quantized_kernel / step
    integers = np.round(ratio)
    error = float(np.max(np.abs(ratio - integers))) if ratio.size else 0.0
    if error > 1e-3:
        raise ValueError("The quantized kernel is not on its per-channel grid (largest "
                         f"distance {error:.3g} steps); is weight quantization enabled? "
                         f"Received: max_grid_error={error:.3g}")
    return integers


@dataclasses.dataclass
class FoldedWeights:
    """A kernel on a per-output-channel integer grid with BatchNorm folded in.

    ``kernel = integers * scale`` (``scale`` over the flattened output channels, i.e. the
    last axis after reshaping to ``[..., channels]``), ``bias`` per output channel.
    ``negated`` marks channels whose BatchNorm factor was negative (their integers changed
    sign so that the scale stays positive). ``multiplier``: the stored integers are the
    b-bit integers times this (1 unless :func:`spread_to_int8` was applied).
    """

    integers: np.ndarray  # same shape as the kernel, integral float64 values
    scale: np.ndarray  # [channels] > 0
    bias: np.ndarray  # [channels]
    negated: np.ndarray  # [channels] bool
    multiplier: np.ndarray | None = None  # [channels] int, default ones

    def __post_init__(self):
        if self.multiplier is None:
            self.multiplier = np.ones(self.scale.size, np.int64)

    @property
    def kernel(self) -> np.ndarray:
        """The float32 kernel ``integers * scale`` (scale broadcast over the last axes)."""
        shape = self.integers.shape
        flat = self.integers.reshape(-1, self.scale.size) * self.scale
        return flat.reshape(shape).astype(np.float32)

    @property
    def grid_integers(self) -> np.ndarray:
        """The b-bit integers (the stored integers divided by ``multiplier``)."""
        flat = self.integers.reshape(-1, self.scale.size) / self.multiplier
        return flat.reshape(self.integers.shape)

    @property
    def grid_scale(self) -> np.ndarray:
        """The b-bit grid's per-channel scale (``scale * multiplier``)."""
        return self.scale * self.multiplier

    @property
    def integer_range(self) -> tuple[int, int]:
        """Smallest and largest b-bit integer."""
        if self.integers.size == 0:
            return 0, 0
        grid = self.grid_integers
        return int(grid.min()), int(grid.max())


# The formulas below are written once for numpy (the export, float64) and for TensorFlow
# (``xp=metamix_tf.export.bias_grid.TF_NUMPY``: the bias grid inside training, float32).


def batch_norm_factor(gamma, variance, epsilon: float, xp=np):
    """A BatchNorm's per-channel factor ``f_c = gamma_c / sqrt(var_c + eps)``."""
    return gamma / xp.sqrt(variance + float(epsilon))


def folded_scale(step, factor, xp=np):
    """Per-channel scale of a kernel ``integers * step`` folded with BatchNorm factor
    ``factor``: ``|step_c f_c|``, or ``|step_c|`` where ``f_c = 0``, or 1 where that is 0."""
    total = step * factor
    scale = xp.where(total == 0, xp.abs(step), xp.abs(total))
    return xp.where(scale > 0, scale, xp.ones_like(scale))


def spread_multiplier(largest, xp=np):
    """The largest ``m_c`` with ``m_c * largest_c <= 127`` (at least 1), ``largest_c`` the
    channel's largest absolute integer (a channel of zeros counts as 1)."""
    return xp.maximum(xp.floor(WEIGHT_QMAX / xp.maximum(largest, 1.0)), 1.0)


def spread_multiplier_for_bias(bias, unit, largest, xp=np):
    """Per channel, the multiplier ``m_c`` in ``[1, spread_multiplier(largest_c)]`` whose
    int32 bias grid ``unit_c / m_c`` (``unit_c = input_scale * scale_c``) has a point
    closest to ``bias_c``; on ties the larger ``m_c`` (the finer grid)."""
    candidates = xp.asarray(range(WEIGHT_QMAX, 0, -1), dtype=unit.dtype)  # larger first
    units = unit / xp.reshape(candidates, (-1, 1))  # [127, channels]
    error = xp.abs(bias - xp.round(bias / units) * units)
    allowed = xp.reshape(candidates, (-1, 1)) <= spread_multiplier(largest, xp)
    error = xp.where(allowed, error, xp.full_like(error, np.inf))
    return xp.take(candidates, xp.argmin(error, axis=0))


def spread_to_int8(folded: FoldedWeights, input_scale: float | None = None) -> FoldedWeights:
    """The same kernel with each channel's integers multiplied by an ``m_c`` that keeps them
    within ``[-127, 127]`` and the scale divided by ``m_c``.

    The real weights do not change, but TFLite stores a conv's bias as an int32 in units of
    ``input_scale * weight_scale``: a finer weight scale rounds the bias more finely, which
    matters for low-bit inputs (large input steps). ``m_c`` is the largest allowed value, or,
    given ``input_scale``, the allowed value whose int32 bias is closest to the real bias.
    """
    flat = folded.integers.reshape(-1, folded.scale.size)
    largest = np.abs(flat).max(axis=0) if flat.size else np.ones(folded.scale.size)
    m = spread_multiplier(largest).astype(np.int64)
    if input_scale is not None:
        m = spread_multiplier_for_bias(folded.bias, input_scale * folded.scale,
                                       largest).astype(np.int64)
    total = m * folded.multiplier
    return FoldedWeights(integers=(flat * m).reshape(folded.integers.shape),
                         scale=folded.scale / m, bias=folded.bias, negated=folded.negated,
                         multiplier=total)


def fold_batch_norm(integers: np.ndarray, step: np.ndarray, bias: np.ndarray | None = None,
                    gamma: np.ndarray | None = None, beta: np.ndarray | None = None,
                    mean: np.ndarray | None = None, variance: np.ndarray | None = None,
                    epsilon: float = 1e-3) -> FoldedWeights:
    """Folds an inference BatchNorm ``gamma (y - mean) / sqrt(var + eps) + beta`` into a
    per-channel integer kernel ``integers * step`` with optional ``bias``.

    With ``f_c = gamma_c / sqrt(var_c + eps)``: the folded scale is ``|step_c * f_c|``, the
    integers are unchanged except for a sign flip where ``step_c * f_c < 0`` (so a 4-bit
    kernel stays on integers), and the bias is ``(bias_c - mean_c) f_c + beta_c``. Without
    BatchNorm statistics (``mean`` is None) only the bias defaults to zeros. Channels with
    ``f_c = 0`` keep their step and get zero integers (their output is the bias).
    """
    integers = np.asarray(integers, np.float64)
    step = np.asarray(step, np.float64).reshape(-1)
    channels = step.size
    flat = integers.reshape(-1, channels)
    bias = np.zeros(channels) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    if mean is None:
        factor = np.ones(channels)
        new_bias = bias
    else:
        gamma = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
        beta = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
        factor = batch_norm_factor(gamma, np.asarray(variance, np.float64), epsilon)
        new_bias = (bias - np.asarray(mean, np.float64)) * factor + beta
    total = step * factor
    negated = total < 0
    zero = total == 0
    scale = folded_scale(step, factor)
    sign = np.where(negated, -1.0, 1.0)
    flat = np.where(zero, 0.0, flat * sign)
    return FoldedWeights(integers=flat.reshape(integers.shape), scale=scale, bias=new_bias,
                         negated=negated)
