"""Pure tensor functions for LSQ quantization and the bit-width search.

Every function here is stateless: step sizes, probabilities and bounds come in as tensors
and get their own gradients back. The straight-through estimator sits on ``round`` only;
clip, divide and multiply keep their true gradients (Esser et al., "Learned Step Size
Quantization", ICLR 2020).

Speed: inside a graph (a ``tf.function`` step, also under a distribution strategy or
inside a ``jit_compile=True`` step, which inlines them), the elementwise parts of
:func:`lsq_quantize` and :func:`lsq_mixture` (the forward, and the backward's input
gradient and per-element step / probability terms) are small
``tf.function(jit_compile=True)`` kernels: XLA fuses each into one loop over the tensor
instead of one TensorFlow kernel, with a full-size temporary, per divide / clip / round /
compare / multiply. The reductions of those terms to the step and probability shapes stay
TensorFlow ops (multi-threaded; XLA's CPU reductions are slower). Eagerly the same ops run
unfused (compiling per new shape would cost more than it saves). Both paths compute the
same IEEE operations in the same order (XLA may contract a multiply-add into an FMA: one
rounding at most). Setting the environment variable ``METAMIX_TF_XLA_OPS=0`` before
importing the package turns the kernels off.

The training and evaluation steps trace the model inside
:func:`metamix_tf.quant.native.enabled_in`: there the quantizers (float32, outside XLA; a
scalar step, a mixture, or a step per channel of the last axes) run
:mod:`metamix_tf.quant.native`'s C++ kernels instead: one pass per forward and per backward
with the reductions done in the same pass (the eager ops' outputs bit for bit, where XLA
may contract an FMA; the step and probability sums in float64, in a fixed order), and no
XLA compilation per tensor shape. A quantizer whose input is the output of a ReLU or ReLU6
op reads that op's input instead and applies the activation in the same pass
(:func:`_folded_input`; the same values and gradients bit for bit), also through a zero
padding between them (:func:`_folded_through_pad`): the activation's backward op is not
built, and its forward op is pruned when nothing else reads it. A quantized layer on the
model's input takes its step size's gradient from a forward of its linear op
(:func:`lsq_linear`), not from that op's input gradient.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from metamix_tf.config import switched_on
from metamix_tf.quant import native

__all__ = [
    "quant_dtype",
    "quant_range",
    "lsq_grad_scale",
    "scale_gradient",
    "lsq_quantize",
    "lsq_mixture",
    "lsq_linear",
    "takes_no_gradient",
    "lsq_init_step",
    "requantize_accumulator",
    "fixed_point_requantize",
    "fixed_point_add",
    "straight_through",
    "argmax_bits_ste",
]


def quant_dtype(dtype) -> tf.DType:
    """The dtype quantizers compute in: float64 for float64 tensors, float32 otherwise
    (half-precision inputs are quantized in float32 and cast back)."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid bounds ``(Qn, Qp)`` so that the grid is ``[-Qn, Qp]``.

    Signed: ``(2^(b-1), 2^(b-1) - 1)``; unsigned: ``(0, 2^b - 1)``.
    """
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_scale(num_elements, qp) -> tf.Tensor:
    """LSQ step-size gradient scale ``g = 1 / sqrt(N * Qp)``.

    ``N`` is the number of elements the step size is shared by (this package uses the
    elements per sample for activations and per output channel for weights).
    """
    num_elements = tf.cast(num_elements, tf.float32)
    qp = tf.cast(qp, tf.float32)
    return tf.math.rsqrt(num_elements * qp)


@tf.custom_gradient
def scale_gradient(x: tf.Tensor, scale: tf.Tensor):
    """Forward: ``x``. Backward: ``dy * scale`` for ``x``, nothing for ``scale``."""

    def grad(dy):
        return dy * scale, tf.zeros_like(scale)

    return tf.identity(x), grad


def _sum_to_shape(t: tf.Tensor, shape: tf.TensorShape) -> tf.Tensor:
    """Sums ``t`` over the axes that broadcasting added or expanded to reach ``shape``."""
    shape = tf.TensorShape(shape)
    if shape.rank == 0:
        return tf.reduce_sum(t)
    lead = t.shape.rank - shape.rank
    axes = list(range(lead)) + [
        lead + i for i, d in enumerate(shape.as_list()) if d == 1 and t.shape[lead + i] != 1
    ]
    return tf.reshape(tf.reduce_sum(t, axis=axes), shape)


_USE_XLA = switched_on("METAMIX_TF_XLA_OPS")


def _fused(fn):
    """``fn`` as one XLA-compiled kernel (compiled once per input shape and dtype) when
    called while tracing a graph; eagerly, the plain ops run (an XLA compilation per new
    shape would cost more than it saves op by op)."""
    if not _USE_XLA:
        return fn
    compiled = tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)

    @functools.wraps(fn)
    def call(*args):
        return fn(*args) if tf.executing_eagerly() else compiled(*args)

    return call


def _grid(x, step, qn, qp):
    """``v = x / s``, ``c = clip(v, -Qn, Qp)`` and the in-range mask ``c == v``."""
    v = x / step
    c = tf.clip_by_value(v, -qn, qp)
    return v, c, tf.equal(v, c)


@_fused
def _quantize_forward(x, step, qn, qp):
    return tf.round(tf.clip_by_value(x / step, -qn, qp)) * step


def _tangent(v, c, inside):
    """``dq/ds`` per element (STE on ``round``): ``r - 1[in] * v``, with ``r = round(c)``."""
    return tf.round(c) - tf.where(inside, v, tf.zeros_like(v))


@_fused
def _quantize_backward(dy, x, step, qn, qp):
    """``dx = dy * 1[in range]`` and the per-element step term ``dy * (r - 1[in] * v)``."""
    v, c, inside = _grid(x, step, qn, qp)
    return tf.where(inside, dy, tf.zeros_like(v)), dy * _tangent(v, c, inside)


@_fused
def _step_tangent(x, step, qn, qp):
    return _tangent(*_grid(x, step, qn, qp))


def _as(x: tf.Tensor, value) -> tf.Tensor:
    """``value`` as a tensor of ``x``'s dtype (numbers, arrays and tensors alike)."""
    value = tf.convert_to_tensor(value)
    return value if value.dtype == x.dtype else tf.cast(value, x.dtype)


def lsq_quantize(x: tf.Tensor, step: tf.Tensor, qn: tf.Tensor, qp: tf.Tensor,
                 grad_scale=None) -> tf.Tensor:
    """LSQ fake quantization ``q = round(clip(x / s, -Qn, Qp)) * s``.

    ``step`` broadcasts against ``x`` (a scalar per tensor, or one value per channel).
    ``qn`` and ``qp`` are scalars (Python numbers or tensors; they may change at run time).

    Gradients (STE on ``round`` only):
      * ``dq/dx = 1`` if ``-Qn <= x/s <= Qp`` else ``0``;
      * ``dq/ds = round(x/s) - x/s`` inside the range, ``-Qn`` below it, ``Qp`` above it,
        summed to the shape of ``step``, then times ``grad_scale`` (the LSQ gradient scale
        ``g``; the same values as :func:`scale_gradient` in front of ``step``, with no op
        of its own);
      * none for ``qn`` and ``qp``.
    """
    x = tf.convert_to_tensor(x)
    step = _as(x, step)
    qn = _as(x, qn)
    qp = _as(x, qp)
    grad_scale = tf.ones_like(step) if grad_scale is None else _as(x, grad_scale)
    if (native.active(x) is not None and _step_columns(x, step) is not None
            and qn.shape.rank == qp.shape.rank == 0
            and grad_scale.shape in (tf.TensorShape([]), step.shape)):
        return _lsq_quantize_native(x, step, qn, qp, grad_scale)
    return _lsq_quantize(x, step, qn, qp, grad_scale)


def _step_columns(x: tf.Tensor, step: tf.Tensor) -> int | None:
    """1 for a scalar step; ``P`` for a step whose shape, leading 1s dropped, is ``x``'s last
    dimensions (``P`` their product: per-channel weight steps); None otherwise."""
    if step.shape.rank == 0:
        return 1
    if not (step.shape.is_fully_defined() and x.shape.rank is not None):
        return None
    dims = step.shape.as_list()
    while dims and dims[0] == 1:
        dims.pop(0)
    if not dims or len(dims) > x.shape.rank or x.shape.as_list()[-len(dims):] != dims:
        return None
    return int(np.prod(dims))


@tf.custom_gradient
def _lsq_quantize(x, step, qn, qp, grad_scale):
    def grad(dy):
        dx, dstep = _quantize_backward(dy, x, step, qn, qp)
        return (dx, _sum_to_shape(dstep, step.shape) * grad_scale, tf.zeros_like(qn),
                tf.zeros_like(qp), tf.zeros_like(grad_scale))

    return _quantize_forward(x, step, qn, qp), grad


def _native_step(step: tf.Tensor) -> tf.Tensor:
    """``step`` as the native kernels take it: a scalar, or flattened to ``[P]``."""
    return step if step.shape.rank == 0 else tf.reshape(step, [-1])


# The activation ops the native kernels can fold into the quantizer that reads their output,
# by their names in the kernels' `activation` attribute.
_FOLDABLE = {"Relu": "relu", "Relu6": "relu6"}


def _folded_input(x: tf.Tensor) -> tuple[tf.Tensor, str]:
    """``(z, name)`` when graph tensor ``x`` is the output of a ReLU or ReLU6 op on ``z`` (of
    ``x``'s dtype), ``(x, "none")`` otherwise. A native quantizer of ``x`` then reads ``z``
    and applies the activation itself (its forward value and its gradient, both exact): the
    activation's own forward op is left without a reader (pruned from the step's graph when
    nothing else reads it) and its backward op is never built."""
    op = x.op
    name = _FOLDABLE.get(op.type)
    if name is None or op.inputs[0].dtype != x.dtype:
        return x, "none"
    return op.inputs[0], name


def _zero_padded(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """``(inner, paddings)`` when graph tensor ``x`` is ``inner`` padded with zeros (a
    ``Pad`` op, or ``PadV2`` with a constant 0: Keras' ``ZeroPadding2D``), ``(x, None)``
    otherwise."""
    op = x.op
    if op.type == "Pad" or (op.type == "PadV2"
                            and tf.get_static_value(op.inputs[2]) == 0):
        return op.inputs[0], op.inputs[1]
    return x, None


def _folded_through_pad(x: tf.Tensor, quantize) -> tf.Tensor:
    """``quantize(z, activation)`` (a native quantizer of ``activation(z)``) for ``x``, with
    the ReLU / ReLU6 that produced ``x`` folded in (:func:`_folded_input`), also where a zero
    padding sits between them (MobileNetV2's ``ZeroPadding2D`` before each stride-2
    depthwise conv): the quantizer then runs on the unpadded tensor and its output is padded
    with zeros, ``q(pad(a(z))) = pad(q(a(z)))`` as ``q(0) = 0`` for every quantizer with a
    nonzero step. The same values and input gradients bit for bit; the step-size sums leave
    out the padding's terms, each an exact 0 (for a finite ``dy``), so they are the same sums
    grouped otherwise (equal up to float64 rounding)."""
    inner, paddings = _zero_padded(x)
    z, activation = _folded_input(inner)
    if paddings is None:
        return quantize(z, activation)
    if activation == "none":  # nothing folds through the padding: quantize the padded x
        return quantize(x, "none")
    return tf.pad(quantize(z, activation), paddings)


def _lsq_quantize_native(x, step, qn, qp, grad_scale):
    """:func:`_lsq_quantize` on the native kernels, for a step that :func:`_step_columns`
    accepts (passed to them as a scalar or a ``[P]`` vector), with a ReLU / ReLU6 that
    produced ``x`` folded in (:func:`_folded_through_pad`)."""
    return _folded_through_pad(x, lambda z, activation: _native_quantizer(activation)(
        z, step, qn, qp, grad_scale))


@functools.cache
def _native_quantizer(activation: str):
    """The native quantizer of ``activation(z)`` (a custom-gradient function of
    ``(z, step, qn, qp, grad_scale)``); one per activation, as the kernels take it as an
    attribute."""
    kernels = native.library()

    @tf.custom_gradient
    def quantize(z, step, qn, qp, grad_scale):
        columns = _native_step(step)

        def grad(dy):
            dz, step_sum = kernels.metamix_lsq_backward(dy, z, columns, qn, qp,
                                                        activation=activation)
            return (dz, tf.reshape(step_sum, tf.shape(step)) * grad_scale, tf.zeros_like(qn),
                    tf.zeros_like(qp), tf.zeros_like(grad_scale))

        return kernels.metamix_lsq_forward(z, columns, qn, qp, activation=activation), grad

    return quantize


# The mixture kernels take the number of branches K as a Python int: the kernels are traced
# once per K (``reduce_retracing`` relaxes tensor shapes, so K cannot come from them).
@_fused
def _mixture_forward(x, steps, probs, qns, qps, num_branches: int):
    y = tf.zeros_like(x)
    for k in range(num_branches):
        y += probs[k] * (tf.round(tf.clip_by_value(x / steps[k], -qns[k], qps[k])) * steps[k])
    return y


@_fused
def _mixture_input_grad(dy, x, steps, probs, qns, qps, num_branches: int):
    """``dy * sum_k p_k 1[x / s_k in range]``."""
    gate = tf.zeros_like(x)
    for k in range(num_branches):
        gate += tf.where(_grid(x, steps[k], qns[k], qps[k])[2], probs[k], 0.0)
    return dy * gate


@_fused
def _mixture_prob_terms(dy, x, steps, qns, qps, num_branches: int):
    """Per-element ``dy * r_k`` for each branch (a tuple of K tensors)."""
    return tuple(dy * tf.round(tf.clip_by_value(x / steps[k], -qns[k], qps[k]))
                 for k in range(num_branches))


@_fused
def _mixture_step_terms(dy, x, steps, qns, qps, num_branches: int):
    """Per-element ``dy * (r_k - 1[in range] * v_k)`` for each branch (a tuple of K)."""
    terms = []
    for k in range(num_branches):
        v, c, inside = _grid(x, steps[k], qns[k], qps[k])
        terms.append(dy * (tf.round(c) - tf.where(inside, v, tf.zeros_like(v))))
    return tuple(terms)


def lsq_mixture(x: tf.Tensor, steps: tf.Tensor, probs: tf.Tensor, qns, qps,
                grad_scale=None) -> tf.Tensor:
    """Probability-weighted sum of K per-tensor LSQ branches, fused in one op.

    Forward: ``y = sum_k p_k * round(clip(x / s_k, -Qn_k, Qp_k)) * s_k`` with ``steps``,
    ``probs``, ``qns``, ``qps`` all of shape ``[K]`` (K known while tracing).

    Gradients: ``dy/dx = sum_k p_k * 1[x/s_k in range]``;
    ``dL/ds_k = p_k * sum(dy * (r_k - 1[in range] * x/s_k)) * g_k`` (LSQ, as in
    :func:`lsq_quantize`, ``g = grad_scale``, shape ``[K]``, or 1); ``dL/dp_k = sum(dy * q_k)``.
    Equivalent to summing :func:`lsq_quantize` branches, but with no per-branch
    intermediate kept for autodiff (the backward recomputes the grid from ``x``); the
    three gradients are separate kernels, so a step that differentiates only some of them
    (e.g. the bit search, which steps the alphas alone) skips the work of the others.
    """
    x = tf.convert_to_tensor(x)
    steps = _as(x, steps)
    probs = _as(x, probs)
    qns = _as(x, qns)
    qps = _as(x, qps)
    grad_scale = tf.ones_like(steps) if grad_scale is None else _as(x, grad_scale)
    if native.active(x) is not None and steps.shape.rank == 1 and steps.shape[0] is not None \
            and steps.shape[0] <= native.MAX_BRANCHES:
        return _lsq_mixture_native(x, steps, probs, qns, qps, grad_scale)
    return _lsq_mixture(x, steps, probs, qns, qps, grad_scale)


@tf.custom_gradient
def _lsq_mixture(x, steps, probs, qns, qps, grad_scale):
    k = steps.shape[0]
    if k is None:
        raise ValueError("`steps` must have a static number of branches. "
                         f"Received: steps with shape {steps.shape}")

    def grad(dy):
        dx = _mixture_input_grad(dy, x, steps, probs, qns, qps, k)
        prob_sums = tf.stack([tf.reduce_sum(t)
                              for t in _mixture_prob_terms(dy, x, steps, qns, qps, k)])
        step_sums = tf.stack([tf.reduce_sum(t)
                              for t in _mixture_step_terms(dy, x, steps, qns, qps, k)])
        return (dx, probs * step_sums * grad_scale, prob_sums * steps, tf.zeros_like(qns),
                tf.zeros_like(qps), tf.zeros_like(grad_scale))

    return _mixture_forward(x, steps, probs, qns, qps, k), grad


def _lsq_mixture_native(x, steps, probs, qns, qps, grad_scale):
    """:func:`_lsq_mixture` on the native kernels (one backward pass for all three
    gradients), with a ReLU / ReLU6 that produced ``x`` folded in (:func:`_folded_through_pad`)."""
    return _folded_through_pad(x, lambda z, activation: _native_mixture(activation)(
        z, steps, probs, qns, qps, grad_scale))


@functools.cache
def _native_mixture(activation: str):
    """As :func:`_native_quantizer`, for the mixture kernels."""
    kernels = native.library()

    @tf.custom_gradient
    def mixture(z, steps, probs, qns, qps, grad_scale):
        def grad(dy):
            dz, prob_sums, step_sums = kernels.metamix_mixture_backward(
                dy, z, steps, probs, qns, qps, activation=activation)
            return (dz, probs * step_sums * grad_scale, prob_sums * steps, tf.zeros_like(qns),
                    tf.zeros_like(qps), tf.zeros_like(grad_scale))

        return kernels.metamix_mixture_forward(z, steps, probs, qns, qps,
                                               activation=activation), grad

    return mixture


# How far takes_no_gradient walks back before it gives up (and answers False).
_MAX_WALK = 64


def takes_no_gradient(x) -> bool:
    """Whether graph tensor ``x`` is computed from data alone: no op on its way back from
    the function's inputs reads a variable (takes a resource), so no gradient with respect
    to a variable passes through ``x``: the model's input image, also after rescaling
    layers. False eagerly, and past :data:`_MAX_WALK` ops."""
    if tf.executing_eagerly() or not isinstance(x, tf.Tensor) or not hasattr(x, "op"):
        return False
    seen, pending = set(), [x.op]
    while pending:
        op = pending.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if len(seen) > _MAX_WALK or any(t.dtype == tf.resource for t in op.inputs):
            return False  # (an op that makes a resource is only reached through a reader)
        pending.extend(t.op for t in op.inputs)
    return True


def lsq_linear(x: tf.Tensor, step: tf.Tensor, qn, qp, grad_scale, kernel: tf.Tensor,
               linear) -> tf.Tensor:
    """``linear(lsq_quantize(x, step, qn, qp, grad_scale), kernel)`` for an ``x`` that takes
    no gradient (:func:`takes_no_gradient`: the model's input) and a scalar ``step``, with
    ``linear(q, kernel)`` linear in ``q`` (a convolution, a matmul).

    Forward: the same ops as the composition. Gradients: ``kernel``'s is ``linear``'s own
    (e.g. ``Conv2DBackpropFilter(q, dy)``); ``step``'s, ``dL/ds = g * <linear^T(dy), t>``
    with ``t = dq/ds`` per element (:func:`lsq_quantize`), is taken as
    ``g * <dy, linear(t, kernel)>`` (the same sum by the adjoint identity, in another
    order): one forward of ``linear`` on ``t`` instead of ``linear``'s input gradient,
    which on a 3-channel image (oneDNN's ``Conv2DBackpropInput`` at the end of the backward
    pass, with nothing to overlap it) costs several times as much; none for ``x``, ``qn``,
    ``qp`` and ``grad_scale``."""
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    step, qn, qp = _as(x, step), _as(x, qn), _as(x, qp)
    grad_scale = _as(x, grad_scale)
    if step.shape.rank != 0:
        raise ValueError("`step` must be a scalar (one step for the whole input). "
                         f"Received: step.shape={step.shape}")

    @tf.custom_gradient
    def apply(step, kernel):
        q = tf.stop_gradient(lsq_quantize(x, step, qn, qp))
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            y = linear(q, kernel)

        def grad(dy):
            tangent = linear(_step_tangent(x, step, qn, qp), kernel)
            return (tf.reduce_sum(dy * tangent) * grad_scale,
                    tape.gradient(y, kernel, output_gradients=dy))

        return y, grad

    return apply(step, tf.convert_to_tensor(kernel))


def lsq_init_step(x: tf.Tensor, qp, axis=None) -> tf.Tensor:
    """LSQ data-driven initial step ``2 * mean(|x|) / sqrt(Qp)`` (over ``axis``; all if None)."""
    mean_abs = tf.reduce_mean(tf.abs(x), axis=axis)
    step = 2.0 * mean_abs / math.sqrt(float(qp))
    return tf.maximum(step, 1e-8)


def _accumulator(x: tf.Tensor, unit) -> tf.Tensor:
    """The kernel's integer accumulator behind float ``x``: ``round(x / unit)`` in float64."""
    return tf.round(tf.cast(x, tf.float64) / tf.cast(unit, tf.float64))


def requantize_accumulator(x: tf.Tensor, unit: tf.Tensor, scale: tf.Tensor, qn, qp,
                           offset=0.0) -> tf.Tensor:
    """The integers an int8 conv (or MEAN) kernel writes for the tensor whose float value
    is ``x``.

    Forward: ``A = round(x / unit)`` in float64, the kernel's integer accumulator (input
    integers times weight integers plus the int32 bias; ``unit = s_in * s_w`` per output
    channel, last axis), recovered exactly while the float error of ``x`` is below half a
    unit; then the kernel's float32 requantization ``round(float32(A) * scale + offset) -
    offset`` (``scale = s_in * s_w / s_out``, ties to even; ``offset``: the output zero
    point where the kernel adds it before rounding, as MEAN does) clipped to ``[-Qn, Qp]``
    (:mod:`metamix_tf.export.kernels`). Returns integers as ``x``'s dtype.

    Gradient: none (inference only).
    """
    accumulator = _accumulator(x, unit)
    offset = tf.cast(offset, tf.float32)
    q = tf.round(tf.cast(accumulator, tf.float32) * tf.cast(scale, tf.float32) + offset)
    return tf.stop_gradient(tf.cast(tf.clip_by_value(q - offset, -qn, qp), x.dtype))


def fixed_point_requantize(x: tf.Tensor, unit: tf.Tensor, multipliers, shifts, qn,
                           qp) -> tf.Tensor:
    """As :func:`requantize_accumulator`, for a kernel that requantizes in fixed point
    (LiteRT's builtin conv kernels, which run INT4-filter convs).

    Forward: ``A = round(x / unit)`` in float64, then in int64 ``t = floor((A 2^l M + 2^30)
    / 2^31)`` and ``floor((t + 2^(r-1)) / 2^r)`` with ``M = multipliers``, ``l = max(shift,
    0)``, ``r = max(-shift, 0)`` per output channel (last axis;
    :func:`metamix_tf.export.kernels.builtin_conv_requantize`), clipped to ``[-Qn, Qp]``.
    Returns integers as ``x``'s dtype. Gradient: none (inference only).
    """
    shifts = np.asarray(shifts, np.int64)
    left, right = np.maximum(shifts, 0), np.maximum(-shifts, 0)
    accumulator = tf.cast(tf.clip_by_value(  # an int32 in the kernel; no int64 overflow
        _accumulator(x, unit), -2.0 ** 31, 2.0 ** 31 - 1), tf.int64)
    t = tf.math.floordiv(accumulator * tf.constant(np.asarray(multipliers, np.int64) << left)
                         + (1 << 30), tf.constant(1 << 31, tf.int64))
    q = tf.math.floordiv(t + tf.constant((1 << right) >> 1), tf.constant(1 << right))
    q = tf.clip_by_value(q, -tf.cast(qn, tf.int64), tf.cast(qp, tf.int64))
    return tf.stop_gradient(tf.cast(q, x.dtype))


def fixed_point_add(x_a: tf.Tensor, x_b: tf.Tensor, steps, multipliers, shift: int,
                    output_step) -> tf.Tensor:
    """The sum an int8 ADD kernel writes for inputs ``x_a``, ``x_b`` on the grids of
    ``steps = (s_a, s_b)``, on the grid of ``output_step``.

    Forward: ``n = round(x / s)`` for each input, then the kernel's fixed-point sum
    ``floor((2^(k-1) + m_a n_a + m_b n_b) / 2^k) * s_out`` with ``multipliers = (m_a,
    m_b)`` and ``shift = k`` (:func:`metamix_tf.export.kernels.add_params`), in int64.
    Unclamped (the quantizer that rounds the sum clamps it). Gradient: none (inference).
    """
    terms = []
    for x, step, multiplier in zip((x_a, x_b), steps, multipliers, strict=True):
        n = tf.cast(tf.round(tf.cast(x, tf.float32) / tf.cast(step, tf.float32)), tf.int64)
        terms.append(n * int(multiplier))
    total = terms[0] + terms[1] + (1 << (int(shift) - 1))
    q = tf.math.floordiv(total, tf.constant(1 << int(shift), tf.int64))
    return tf.stop_gradient(tf.cast(q, x_a.dtype) * tf.cast(output_step, x_a.dtype))


@tf.custom_gradient
def straight_through(hard: tf.Tensor, soft: tf.Tensor):
    """Forward: ``hard``. Backward: the whole gradient goes to ``soft``, none to ``hard``."""

    def grad(dy):
        return tf.zeros_like(hard), dy

    return tf.identity(hard), grad


def argmax_bits_ste(alpha: tf.Tensor, bits: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    """Bit-width of one layer for the cost model, with a straight-through hard argmax.

    Forward: ``bits[argmax(alpha)]``. Backward: through
    ``sum(softmax(alpha / T) * bits)``.
    """
    bits = tf.cast(bits, tf.float32)
    alpha = tf.cast(alpha, tf.float32)  # GBOPs are float32 whatever the model's dtype
    probs = tf.nn.softmax(alpha / temperature)
    soft = tf.reduce_sum(probs * bits)
    hard = tf.gather(bits, tf.argmax(alpha))
    return straight_through(hard, soft)
