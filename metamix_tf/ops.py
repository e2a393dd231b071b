"""Pure tensor functions for LSQ quantization and the bit-width search.

Every function here is stateless: step sizes, probabilities and bounds come in as tensors
and get their own gradients back. The straight-through estimator sits on ``round`` only;
clip, divide and multiply keep their true gradients (Esser et al., "Learned Step Size
Quantization", ICLR 2020).
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = [
    "quant_range",
    "lsq_grad_scale",
    "scale_gradient",
    "lsq_quantize",
    "lsq_mixture",
    "lsq_init_step",
    "straight_through",
    "expected_bits",
]


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


@tf.custom_gradient
def lsq_quantize(x: tf.Tensor, step: tf.Tensor, qn: tf.Tensor, qp: tf.Tensor):
    """LSQ fake quantization ``q = round(clip(x / s, -Qn, Qp)) * s``.

    ``step`` broadcasts against ``x`` (a scalar per tensor, or one value per channel).

    Gradients (STE on ``round`` only):
      * ``dq/dx = 1`` if ``-Qn <= x/s <= Qp`` else ``0``;
      * ``dq/ds = round(x/s) - x/s`` inside the range, ``-Qn`` below it, ``Qp`` above it,
        summed to the shape of ``step``;
      * none for ``qn`` and ``qp``.
    Apply the LSQ gradient scale to ``step`` beforehand with :func:`scale_gradient`.
    """
    v = x / step
    c = tf.clip_by_value(v, -qn, qp)
    r = tf.round(c)
    inside = tf.cast(tf.equal(v, c), x.dtype)

    def grad(dy):
        dx = dy * inside
        dstep = _sum_to_shape(dy * (r - inside * v), step.shape)
        return dx, dstep, tf.zeros_like(qn), tf.zeros_like(qp)

    return r * step, grad


@tf.custom_gradient
def lsq_mixture(x: tf.Tensor, steps: tf.Tensor, probs: tf.Tensor, qns: tf.Tensor, qps: tf.Tensor):
    """Probability-weighted sum of K per-tensor LSQ branches, fused in one op.

    Forward: ``y = sum_k p_k * round(clip(x / s_k, -Qn_k, Qp_k)) * s_k`` with ``steps``,
    ``probs``, ``qns``, ``qps`` all of shape ``[K]``.

    Gradients: ``dy/dx = sum_k p_k * 1[x/s_k in range]``;
    ``dL/ds_k = p_k * sum(dy * (r_k - 1[in range] * x/s_k))`` (LSQ, as in
    :func:`lsq_quantize`); ``dL/dp_k = sum(dy * q_k)``.
    Equivalent to summing :func:`lsq_quantize` branches, but with one pass per branch and
    no per-branch intermediate kept for autodiff.
    """
    num_branches = steps.shape[0]
    y = tf.zeros_like(x)
    dx_gate = tf.zeros_like(x)
    saved = []
    for k in range(num_branches):
        v = x / steps[k]
        c = tf.clip_by_value(v, -qns[k], qps[k])
        r = tf.round(c)
        inside = tf.cast(tf.equal(v, c), x.dtype)
        y += probs[k] * (r * steps[k])
        dx_gate += probs[k] * inside
        saved.append((v, r, inside))

    def grad(dy):
        dsteps, dprobs = [], []
        for k, (v, r, inside) in enumerate(saved):
            dprobs.append(tf.reduce_sum(dy * r) * steps[k])
            dsteps.append(probs[k] * tf.reduce_sum(dy * (r - inside * v)))
        return (dy * dx_gate, tf.stack(dsteps), tf.stack(dprobs),
                tf.zeros_like(qns), tf.zeros_like(qps))

    return y, grad


def lsq_init_step(x: tf.Tensor, qp, axis=None) -> tf.Tensor:
    """LSQ data-driven initial step ``2 * mean(|x|) / sqrt(Qp)`` (over ``axis``; all if None)."""
    mean_abs = tf.reduce_mean(tf.abs(x), axis=axis)
    step = 2.0 * mean_abs / math.sqrt(float(qp))
    return tf.maximum(step, 1e-8)


@tf.custom_gradient
def straight_through(hard: tf.Tensor, soft: tf.Tensor):
    """Forward: ``hard``. Backward: the whole gradient goes to ``soft``, none to ``hard``."""

    def grad(dy):
        return tf.zeros_like(hard), dy

    return tf.identity(hard), grad


def expected_bits(alpha: tf.Tensor, bits: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    """Bit-width of one layer for the cost model, with a straight-through hard argmax.

    Forward: ``bits[argmax(alpha)]``. Backward: through
    ``sum(softmax(alpha / T) * bits)``.
    """
    bits = tf.cast(bits, tf.float32)
    probs = tf.nn.softmax(alpha / temperature)
    soft = tf.reduce_sum(probs * bits)
    hard = tf.gather(bits, tf.argmax(alpha))
    return straight_through(hard, soft)
