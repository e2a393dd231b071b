"""metamix_tf.quant.ops: LSQ forward values and gradients against NumPy references."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from metamix_tf.quant import native, ops

BITS = (2, 3, 4, 5, 8)


# -- NumPy references ----------------------------------------------------------------------
def np_lsq(x, step, qn, qp, dy):
    """LSQ forward and gradients (Esser et al. 2020), all in float32 like TensorFlow.

    Returns ``q``, ``dL/dx`` and the per-element step gradient ``dy * dq/ds`` (not yet
    summed to the step's shape)."""
    x = np.asarray(x, np.float32)
    step = np.asarray(step, np.float32)
    v = x / step
    inside = (v >= -qn) & (v <= qp)
    r = np.round(np.clip(v, -qn, qp))  # half to even, like tf.round
    q = r * step
    dq_ds = np.where(inside, r - v, r)  # r - v inside, -Qn below, +Qp above
    return q, dy * inside, dy * dq_ds


def np_softmax(a):
    e = np.exp(a - np.max(a))
    return e / e.sum()


def tape_grads(fn, inputs, dy, where="eager"):
    """Output of ``fn(*inputs)`` and the gradients of ``sum(fn(*inputs) * dy)``, computed
    eagerly (plain TensorFlow ops), in a ``tf.function`` (the XLA-fused kernels) or in one
    traced inside :func:`native.enabled_in` (the C++ kernels)."""
    inputs = [tf.constant(v, tf.float32) for v in inputs]

    def forward_backward(*inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = fn(*inputs)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, inputs)

    if where in ("graph", "native"):
        forward_backward = tf.function(forward_backward)
    with native.enabled_in() if where == "native" else contextlib.nullcontext():
        y, grads = forward_backward(*inputs)  # traced here
    return y.numpy(), [g.numpy() for g in grads]


# "native": traced as the training steps trace, so the quantizers (per-tensor and
# per-channel steps, mixtures) run the C++ kernels of metamix_tf.quant.native.
WHERE = ["eager", "graph", "native"]


def sum_close(actual, expected, terms, rtol=1e-5):
    """A float32 sum: same value up to rounding, relative to the sum of |terms|."""
    scale = np.sum(np.abs(terms), axis=tuple(range(np.ndim(terms) - np.ndim(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.max(scale) + 1e-12)


# Granularities: a scalar step, one step per channel of the last axis (Conv2D / Dense
# kernels, or per-channel activations), and a (C, M) step on a 4-D depthwise kernel.
GRANULARITIES = {
    "per_tensor": ((4, 5, 5, 6), ()),
    "per_channel": ((4, 5, 5, 6), (6,)),
    "depthwise": ((3, 3, 6, 2), (6, 2)),
}


def _case(granularity, bits, signed, seed=0):
    rng = np.random.default_rng(seed)
    x_shape, step_shape = GRANULARITIES[granularity]
    qn, qp = ops.quant_range(bits, signed)
    step = rng.uniform(0.05, 0.3, step_shape).astype(np.float32)
    # Spread x over the whole grid and beyond it on both sides (clipping on both ends,
    # also for unsigned grids, which clip negative inputs to zero).
    span = (qp + qn + 4) * np.max(step)
    x = rng.uniform(-(qn + 2) * np.max(step) - 0.5, span, x_shape).astype(np.float32)
    dy = rng.normal(size=x_shape).astype(np.float32)
    return x, step, qn, qp, dy


# -- quant_range, grad scale -----------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,expected", [
    (2, False, (0, 3)), (2, True, (2, 1)), (3, True, (4, 3)), (4, False, (0, 15)),
    (5, True, (16, 15)), (8, False, (0, 255)), (8, True, (128, 127)), (16, True, (32768, 32767)),
])
def test_quant_range(bits, signed, expected):
    assert ops.quant_range(bits, signed) == expected


@pytest.mark.parametrize("n,qp", [(1, 1), (100, 15), (6144, 255), (12, 127)])
def test_lsq_grad_scale(n, qp):
    np.testing.assert_allclose(ops.lsq_grad_scale(n, qp).numpy(), 1 / np.sqrt(n * qp),
                               rtol=1e-6)


def test_scale_gradient_forward_identity_and_scaled_backward():
    x = tf.constant([1.5, -2.0, 3.0])
    scale = tf.constant([0.5, 2.0, 0.0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, scale])
        y = ops.scale_gradient(x, scale)
        loss = tf.reduce_sum(y * tf.constant([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), [0.5, 4.0, 0.0])
    np.testing.assert_array_equal(tape.gradient(loss, scale).numpy(), [0.0, 0.0, 0.0])


# -- lsq_quantize ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", BITS)
def test_lsq_quantize_matches_numpy(granularity, bits, signed, where):
    x, step, qn, qp, dy = _case(granularity, bits, signed, seed=bits)
    q_ref, dx_ref, ds_terms = np_lsq(x, step, qn, qp, dy)
    ds_ref = ds_terms.reshape((-1,) + step.shape).sum(axis=0)

    q, (dx, ds) = tape_grads(lambda x, s: ops.lsq_quantize(x, s, qn, qp), [x, step], dy, where)

    # Same float32 operations: equal up to one rounding (an FMA the compiler may form).
    np.testing.assert_allclose(q, q_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(dx, dx_ref)
    assert ds.shape == step.shape
    sum_close(ds, ds_ref, ds_terms.reshape((-1,) + step.shape))
    # The grid is respected: q / s are integers in [-Qn, Qp].
    levels = q / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.min() >= -qn - 1e-3 and levels.max() <= qp + 1e-3
    # Both clipping regions occur, so the -Qn / +Qp step-gradient terms are exercised.
    v = x / step
    assert (v > qp).any() and (v < -qn).any()


def test_lsq_quantize_step_gradient_terms():
    """dq/ds by hand at a few points (s = 0.5, unsigned 2 bits: grid 0..3)."""
    x = np.array([0.3, 0.9, 1.25, -1.0, 5.0], np.float32)  # v = 0.6, 1.8, 2.5, -2, 10
    dy = np.ones_like(x)
    q, (dx, ds) = tape_grads(lambda x, s: ops.lsq_quantize(x, s, 0, 3), [x, 0.5], dy)
    np.testing.assert_allclose(q, [0.5, 1.0, 1.0, 0.0, 1.5])  # 2.5 rounds to even: 2
    np.testing.assert_array_equal(dx, [1, 1, 1, 0, 0])
    # (1 - 0.6) + (2 - 1.8) + (2 - 2.5) + (-Qn = 0) + (Qp = 3)
    np.testing.assert_allclose(ds, 0.4 + 0.2 - 0.5 + 0.0 + 3.0, rtol=1e-6)


@pytest.mark.parametrize("bounds", ["python", "numpy", "tensor"])
def test_lsq_quantize_accepts_bounds_of_any_kind(bounds):
    x, step, qn, qp, dy = _case("per_tensor", 4, True)
    convert = {"python": float, "numpy": np.float32, "tensor": tf.constant}[bounds]
    q = ops.lsq_quantize(x, step, convert(float(qn)), convert(float(qp)))
    np.testing.assert_allclose(q.numpy(), np_lsq(x, step, qn, qp, dy)[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", ["eager", "function", "jit_function"])
def test_lsq_quantize_same_inside_tf_function_and_xla(where):
    x, step, qn, qp, dy = _case("per_channel", 3, False)

    def fn(x, s):
        with tf.GradientTape() as tape:
            tape.watch([x, s])
            loss = tf.reduce_sum(ops.lsq_quantize(x, s, qn, qp) * dy)
        return tape.gradient(loss, [x, s])

    if where != "eager":
        fn = tf.function(fn, jit_compile=where == "jit_function")
    dx, ds = fn(tf.constant(x), tf.constant(step))
    _, dx_ref, ds_terms = np_lsq(x, step, qn, qp, dy)
    np.testing.assert_array_equal(dx.numpy(), dx_ref)
    sum_close(ds.numpy(), ds_terms.reshape(-1, 6).sum(0), ds_terms.reshape(-1, 6))


def test_scaled_step_gradient():
    """With scale_gradient(s, g) in front, the step gradient is g times the LSQ one."""
    x, step, qn, qp, dy = _case("per_tensor", 4, False)
    n = x[0].size
    g = ops.lsq_grad_scale(n, qp)
    _, (_, ds_scaled) = tape_grads(
        lambda x, s: ops.lsq_quantize(x, ops.scale_gradient(s, g), qn, qp), [x, step], dy)
    _, (_, ds) = tape_grads(lambda x, s: ops.lsq_quantize(x, s, qn, qp), [x, step], dy)
    np.testing.assert_allclose(ds_scaled, ds / np.sqrt(n * qp), rtol=1e-5)


@pytest.mark.parametrize("where", WHERE)
def test_grad_scale_argument_equals_scale_gradient_in_front(where):
    """``grad_scale=g`` gives the values of ``scale_gradient(s, g)`` in front, bit for bit
    (the same multiply after the same sum), for one step and for a mixture's K steps."""
    x, step, qn, qp, dy = _case("per_channel", 3, False)
    g = np.float32(0.37)
    inside = tape_grads(lambda x, s: ops.lsq_quantize(x, s, qn, qp, g), [x, step], dy, where)
    in_front = tape_grads(lambda x, s: ops.lsq_quantize(x, ops.scale_gradient(s, g), qn, qp),
                          [x, step], dy, where)
    x, steps, probs, qns, qps, dy = _mixture_case((2, 4, 8), False)
    gs = np.array([0.3, 0.2, 0.1], np.float32)
    mixture_inside = tape_grads(lambda x, s, p: ops.lsq_mixture(x, s, p, qns, qps, gs),
                                [x, steps, probs], dy, where)
    mixture_in_front = tape_grads(
        lambda x, s, p: ops.lsq_mixture(x, ops.scale_gradient(s, gs), p, qns, qps),
        [x, steps, probs], dy, where)
    for (y_a, grads_a), (y_b, grads_b) in ((inside, in_front),
                                           (mixture_inside, mixture_in_front)):
        np.testing.assert_array_equal(y_a, y_b)
        for a, b in zip(grads_a, grads_b, strict=True):
            np.testing.assert_array_equal(a, b)


# -- against TensorFlow's FakeQuant ----------------------------------------------------------
def _fake_quant_case(signed):
    """8-bit inputs on which FakeQuant and LSQ must agree exactly.

    ``s = 2^-4``: a power of two, so ``255 s``, ``-128 s``, ``127 s`` and FakeQuant's nudged
    scale ``(max - min) / 255 = s`` and zero point are exact in float32 (no nudging). The
    inputs are ``(k + u) s`` with the fraction ``u`` at least 0.05 away from 0.5: FakeQuant
    rounds ``floor(v + 1/2)`` (ties up) while ``tf.round`` rounds ties to even, so exact ties
    are the one place they may differ (see the tie test below); elsewhere the tolerance is
    zero. ``k`` covers the grid and 10 levels beyond it on both sides (clipping)."""
    s = 2.0 ** -4
    qn, qp = ops.quant_range(8, signed)
    rng = np.random.default_rng(1)
    k = rng.integers(-qn - 10, qp + 10, 4000)
    u = rng.choice([rng.uniform(0.05, 0.45), rng.uniform(0.55, 0.95)], 4000)
    x = ((k + u) * s).astype(np.float32)
    x = np.concatenate([x, np.float32(s) * np.array([-qn, qp, 0], np.float32)])  # bounds
    return x, s, qn, qp


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_8_bit_matches_fake_quant_with_min_max_vars(signed, where):
    x, s, qn, qp = _fake_quant_case(signed)
    dy = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    q, (dx, _) = tape_grads(lambda x, s: ops.lsq_quantize(x, s, qn, qp), [x, s], dy, where)
    fq, (fq_dx,) = tape_grads(
        lambda x: tf.quantization.fake_quant_with_min_max_vars(x, -qn * s, qp * s, num_bits=8),
        [x], dy)
    np.testing.assert_array_equal(q, fq)
    np.testing.assert_array_equal(dx, fq_dx)  # both pass the gradient on [min, max]


def test_ties_round_to_even_unlike_fake_quant():
    s = 2.0 ** -4
    x = np.array([0.5, 1.5, 2.5], np.float32) * s
    q = ops.lsq_quantize(x, s, 0, 255).numpy()
    fq = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 255 * s, num_bits=8).numpy()
    np.testing.assert_array_equal(q / s, [0, 2, 2])
    np.testing.assert_array_equal(fq / s, [1, 2, 3])


# -- lsq_mixture -----------------------------------------------------------------------------
MIXTURES = [((2, 4, 8), False), ((2, 4, 8), True), ((2, 3, 4, 5, 6, 8), False), ((3, 4, 8), True)]


def _mixture_case(candidates, signed, seed=0):
    rng = np.random.default_rng(seed)
    ranges = [ops.quant_range(b, signed) for b in candidates]
    qns = np.array([r[0] for r in ranges], np.float32)
    qps = np.array([r[1] for r in ranges], np.float32)
    x = rng.normal(0.0, 1.5, (4, 6, 6, 5)).astype(np.float32)
    steps = (3.0 / qps * rng.uniform(0.5, 1.5, len(candidates))).astype(np.float32)
    probs = np_softmax(rng.normal(size=len(candidates))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    return x, steps, probs, qns, qps, dy


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("candidates,signed", MIXTURES)
def test_lsq_mixture_matches_numpy(candidates, signed, where):
    x, steps, probs, qns, qps, dy = _mixture_case(candidates, signed)
    y, (dx, dsteps, dprobs) = tape_grads(
        lambda x, s, p: ops.lsq_mixture(x, s, p, qns, qps), [x, steps, probs], dy, where)

    y_ref, dx_ref = np.zeros_like(x), np.zeros_like(x)
    for k in range(len(candidates)):
        q_k, dx_k, ds_k = np_lsq(x, steps[k], qns[k], qps[k], dy)
        y_ref += probs[k] * q_k
        dx_ref += probs[k] * dx_k
        sum_close(dsteps[k], probs[k] * ds_k.sum(), probs[k] * ds_k)
        sum_close(dprobs[k], (dy * q_k).sum(), dy * q_k)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("candidates,signed", MIXTURES)
def test_lsq_mixture_equals_weighted_branches(candidates, signed, where):
    """Value and every gradient equal ``sum_k p_k * lsq_quantize(x, s_k)``."""
    x, steps, probs, qns, qps, dy = _mixture_case(candidates, signed, seed=3)

    def branches(x, s, p):
        return tf.add_n([p[k] * ops.lsq_quantize(x, s[k], qns[k], qps[k])
                         for k in range(len(candidates))])

    fused = tape_grads(lambda x, s, p: ops.lsq_mixture(x, s, p, qns, qps), [x, steps, probs],
                       dy, where)
    summed = tape_grads(branches, [x, steps, probs], dy, where)
    np.testing.assert_allclose(fused[0], summed[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(fused[1], summed[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_lsq_mixture_one_hot_probs_is_that_branch():
    x, steps, _, qns, qps, dy = _mixture_case((2, 4, 8), True)
    y = ops.lsq_mixture(x, steps, np.array([0, 1, 0], np.float32), qns, qps).numpy()
    np.testing.assert_allclose(y, np_lsq(x, steps[1], qns[1], qps[1], dy)[0], rtol=1e-6)


# -- argmax_bits_ste, straight_through, lsq_init_step ------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [[0.1, 0.7, -0.3], [2.0, -1.0, 0.5, 0.4]])
def test_expected_bits(alpha, temperature):
    alpha = np.array(alpha, np.float32)
    bits = np.array([2, 3, 4, 8][:len(alpha)], np.float32)
    a = tf.Variable(alpha)
    with tf.GradientTape() as tape:
        e = ops.argmax_bits_ste(a, bits, temperature)
    assert e.numpy() == bits[np.argmax(alpha)]  # forward: the argmax branch's bits
    # backward: d/d(alpha) of sum(softmax(alpha / T) * bits)
    p = np_softmax(alpha / temperature)
    expected = p * (bits - np.sum(p * bits)) / temperature
    np.testing.assert_allclose(tape.gradient(e, a).numpy(), expected, rtol=1e-5, atol=1e-7)
    assert np.abs(expected).max() > 0


def test_straight_through():
    hard, soft = tf.constant([1.0, 2.0]), tf.constant([0.3, 0.4])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([hard, soft])
        y = ops.straight_through(hard, soft)
        loss = tf.reduce_sum(y * [3.0, 5.0])
    np.testing.assert_array_equal(y.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(tape.gradient(loss, soft).numpy(), [3.0, 5.0])
    np.testing.assert_array_equal(tape.gradient(loss, hard).numpy(), [0.0, 0.0])


@pytest.mark.parametrize("qp", [3, 15, 127, 255])
@pytest.mark.parametrize("axis", [None, (0, 1, 2)])
def test_lsq_init_step(qp, axis):
    x = np.random.default_rng(qp).normal(size=(3, 3, 4, 5)).astype(np.float32)
    expected = 2 * np.mean(np.abs(x), axis=axis) / np.sqrt(qp)
    np.testing.assert_allclose(ops.lsq_init_step(x, qp, axis=axis).numpy(), expected, rtol=1e-5)


def test_lsq_init_step_is_positive_for_zeros():
    assert ops.lsq_init_step(np.zeros((4, 4), np.float32), 15).numpy() == pytest.approx(1e-8)


def test_requantize_accumulator_matches_the_kernel_arithmetic_and_has_no_gradient():
    from metamix_tf.export import kernels

    rng = np.random.default_rng(0)
    unit = np.array([0.013, 0.5, 3e-5])
    scale = np.array([0.25, 0.5, 1.5], np.float32)  # 0.5 and 1.5 make exact ties
    acc = rng.integers(-500, 500, (64, 3))
    x = tf.constant(((acc + rng.uniform(-0.3, 0.3, acc.shape)) * unit).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        q = ops.requantize_accumulator(x, unit, scale, 128.0, 127.0)
    np.testing.assert_array_equal(q.numpy(), kernels.conv_requantize(acc, scale, 0))
    assert tape.gradient(q, x) is None
    # MEAN adds its (here odd) output zero point before rounding: other ties go up
    shifted = ops.requantize_accumulator(x, unit, scale, 128.0, 127.0, offset=-5.0)
    np.testing.assert_array_equal(shifted.numpy(),
                                  kernels.mean_requantize(acc, scale, -5, (-133, 122)) + 5)
    assert (shifted.numpy() != q.numpy()).any()


def test_fixed_point_requantize_matches_the_builtin_kernel_arithmetic():
    from metamix_tf.export import kernels

    rng = np.random.default_rng(0)
    unit = np.array([0.013, 0.5, 3e-5, 0.02, 0.1])
    multipliers, shifts = kernels.builtin_conv_params(1.0, [0.125, 0.3, 0.0173, 1.7, 0.5],
                                                      1.0)
    acc = rng.integers(-2000, 2000, (256, 5))
    x = tf.constant(((acc + rng.uniform(-0.3, 0.3, acc.shape)) * unit).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        q = ops.fixed_point_requantize(x, unit, multipliers, shifts, 128, 127)
    np.testing.assert_array_equal(
        q.numpy(), kernels.builtin_conv_requantize(acc, multipliers, shifts, 0))
    assert tape.gradient(q, x) is None
    # a left shift, no shift, and accumulators at 0.375 of a unit (which round up)
    assert shifts[3] == 1 and shifts[4] == 0 and (acc[:, 0] % 8 == 3).any()
