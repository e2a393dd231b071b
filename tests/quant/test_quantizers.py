"""metamix_tf.quant.quantizers: every mode of ActivationQuantizer, WeightQuantizer, calibration
(eager, traced, and per replica under MirroredStrategy), retracing and argument errors."""

import numpy as np
import pytest
import tensorflow as tf

from metamix_tf.quant import ops
from metamix_tf.quant.quantizers import MODES, ActivationQuantizer, WeightQuantizer

CANDIDATES = (2, 4, 8)
SHAPE = (4, 5, 5, 3)  # per-sample elements N = 75


def np_quantize(x, step, bits, signed):
    qn, qp = ops.quant_range(bits, signed)
    return np.round(np.clip(x / np.float32(step), -qn, qp)) * np.float32(step)


def make_quantizer(signed=False, candidates=CANDIDATES, mode="float", steps=None, **kwargs):
    q = ActivationQuantizer(candidate_bits=candidates, signed=signed, mode=mode, **kwargs)
    q.build(SHAPE)
    if steps is None:
        steps = [1.0 / 2 ** b for b in q.candidate_bits]
    q.step_size.assign(np.asarray(steps, np.float32))
    return q


def data(seed=0, shape=SHAPE, signed=True):
    x = np.random.default_rng(seed).normal(0.5, 1.0, shape).astype(np.float32)
    return x if signed else np.abs(x)


# -- modes -----------------------------------------------------------------------------------
def test_float_mode_is_the_identity():
    q = make_quantizer(mode="float")
    x = tf.constant(data())
    assert q(x) is x or np.array_equal(q(x).numpy(), x.numpy())


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_uniform_mode_quantizes_with_that_branch(index, signed):
    q = make_quantizer(signed=signed, mode="uniform")
    q.uniform_index = index
    x = data(index)
    step = q.step_size.numpy()[index]
    np.testing.assert_allclose(q(x).numpy(), np_quantize(x, step, CANDIDATES[index], signed),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", CANDIDATES)
def test_selected_mode_uses_bit_index(bits):
    q = make_quantizer(signed=True, mode="selected")
    assert q.select(bits) == bits
    assert q.selected_bits == bits and int(q.bit_index.numpy()) == CANDIDATES.index(bits)
    assert q.selected_step == pytest.approx(1.0 / 2 ** bits)
    x = data(1)
    np.testing.assert_allclose(q(x).numpy(), np_quantize(x, 1.0 / 2 ** bits, bits, True),
                               rtol=1e-6, atol=1e-7)


def test_select_defaults_to_argmax_alpha():
    q = make_quantizer(mode="selected")
    q.alpha.assign([0.1, 0.9, -0.2])
    assert q.argmax_bits == 4
    assert q.select() == 4 and q.selected_bits == 4


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_mixture_mode_is_the_softmax_weighted_sum(temperature):
    q = make_quantizer(signed=True, mode="mixture", temperature=temperature)
    alpha = np.array([0.3, -0.5, 1.0], np.float32)
    q.alpha.assign(alpha)
    x = data(2)
    e = np.exp(alpha / temperature)
    probs = e / e.sum()
    expected = sum(p * np_quantize(x, 1.0 / 2 ** b, b, True)
                   for p, b in zip(probs, CANDIDATES, strict=True))
    np.testing.assert_allclose(q(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.probabilities().numpy(), probs, rtol=1e-6)


def test_one_branch_quantizer_is_that_branch_in_every_quantized_mode():
    x = data(3)
    expected = np_quantize(x, 1.0 / 2 ** 8, 8, True)
    for mode in ("uniform", "selected", "mixture"):
        q = make_quantizer(signed=True, candidates=(8,), mode=mode)
        q.uniform_index = 0
        assert not q.searchable and not q.alpha.trainable
        np.testing.assert_allclose(q(x).numpy(), expected, rtol=1e-6, atol=1e-7)


# -- gradients -------------------------------------------------------------------------------
def _grads(q, x, dy):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(q(x) * dy)
    return tape.gradient(loss, [x, q.step_size, q.alpha])


@pytest.mark.parametrize("mode", ["float", "uniform", "selected", "mixture"])
def test_alpha_gets_a_gradient_only_in_mixture_mode(mode):
    q = make_quantizer(signed=True, mode=mode)
    q.alpha.assign([0.2, 0.1, -0.3])
    x = data(4)
    dx, dstep, dalpha = _grads(q, x, np.random.default_rng(5).normal(size=SHAPE))
    if mode == "mixture":
        assert dalpha is not None and np.abs(dalpha.numpy()).max() > 0
    else:
        assert dalpha is None or not np.any(dalpha.numpy())
    if mode == "float":
        assert dstep is None
        np.testing.assert_array_equal(dx.numpy(), np.random.default_rng(5).normal(size=SHAPE)
                                      .astype(np.float32))


@pytest.mark.parametrize("grad_scale", ["per_sample", "per_batch", "none"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_step_gradient_is_scaled_lsq(grad_scale, signed):
    """Only the used branch's step gets a gradient: LSQ's times g = 1/sqrt(N Qp)."""
    q = make_quantizer(signed=signed, mode="uniform", grad_scale=grad_scale)
    q.uniform_index = 1  # 4 bits
    x = data(6, signed=signed)
    dy = np.random.default_rng(7).normal(size=SHAPE).astype(np.float32)
    _, dstep, _ = _grads(q, x, dy)
    step = np.float32(1.0 / 16)
    qn, qp = ops.quant_range(4, signed)
    v = x / step
    r = np.round(np.clip(v, -qn, qp))
    lsq = np.sum(dy * np.where((v >= -qn) & (v <= qp), r - v, r))
    n = {"per_sample": 75, "per_batch": 300, "none": None}[grad_scale]
    g = 1.0 if n is None else 1.0 / np.sqrt(n * qp)
    dstep = dstep.numpy()
    assert dstep[0] == 0 and dstep[2] == 0
    np.testing.assert_allclose(dstep[1], g * lsq, rtol=1e-4)


def test_mixture_step_gradients_are_probability_weighted():
    q = make_quantizer(signed=True, mode="mixture", grad_scale="none")
    q.alpha.assign([0.5, 0.0, -0.5])
    x = data(8)
    dy = np.random.default_rng(9).normal(size=SHAPE).astype(np.float32)
    _, dstep, _ = _grads(q, x, dy)
    probs = q.probabilities().numpy()
    for k, b in enumerate(CANDIDATES):
        qn, qp = ops.quant_range(b, True)
        v = x / np.float32(1.0 / 2 ** b)
        r = np.round(np.clip(v, -qn, qp))
        lsq = np.sum(dy * np.where((v >= -qn) & (v <= qp), r - v, r))
        np.testing.assert_allclose(dstep.numpy()[k], probs[k] * lsq, rtol=1e-4, atol=1e-5)


# -- calibration -----------------------------------------------------------------------------
def _expected_steps(x, candidates=CANDIDATES, signed=False):
    return np.array([2 * np.mean(np.abs(x)) / np.sqrt(ops.quant_range(b, signed)[1])
                     for b in candidates], np.float32)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_calibrate_sets_lsq_initial_steps(signed):
    q = make_quantizer(signed=signed, mode="calibrate")
    x = data(10)
    y = q(x)
    np.testing.assert_array_equal(y.numpy(), x)  # identity while calibrating
    np.testing.assert_allclose(q.step_size.numpy(), _expected_steps(x, signed=signed),
                               rtol=1e-5)
    assert q.initialized.numpy() == 1.0


def test_calibrate_inside_tf_function():
    q = make_quantizer(mode="calibrate")
    x = data(11)
    tf.function(lambda x: q(x))(tf.constant(x))
    np.testing.assert_allclose(q.step_size.numpy(), _expected_steps(x), rtol=1e-5)


def test_calibrate_per_replica_averages_over_the_global_batch(two_cpu_strategy):
    """Each replica computes 2 mean|x_r| / sqrt(Qp) on its half of the batch; step sizes
    have aggregation="mean", so the variable ends at the mean over replicas, which for equal
    halves is the LSQ initial step of the global batch."""
    strategy = two_cpu_strategy
    x = data(12, shape=(8, 5, 5, 3))
    x[4:] *= 3.0  # the two halves differ
    halves = [x[:4], x[4:]]
    with strategy.scope():
        q = make_quantizer(mode="calibrate")
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(halves[ctx.replica_id_in_sync_group]))

    @tf.function
    def run(values):
        strategy.run(q, args=(values,))

    run(per_replica)
    expected = _expected_steps(x)
    np.testing.assert_allclose(expected, (_expected_steps(halves[0])
                                          + _expected_steps(halves[1])) / 2, rtol=1e-5)
    for local in strategy.experimental_local_results(q.step_size):
        np.testing.assert_allclose(np.asarray(local), expected, rtol=1e-5)
    # a single replica's value would be far off
    assert not np.allclose(_expected_steps(halves[0]), expected, rtol=0.1)


# -- tracing ---------------------------------------------------------------------------------
def test_selected_mode_changes_bits_without_retracing():
    q = make_quantizer(signed=True, mode="selected")
    traces = []

    @tf.function
    def forward(x):
        traces.append(1)  # runs only while tracing
        return q(x)

    x = tf.constant(data(13))
    q.select(2)
    y2 = forward(x).numpy()
    q.select(8)
    y8 = forward(x).numpy()
    assert len(traces) == 1
    assert not np.allclose(y2, y8)
    np.testing.assert_allclose(y2, np_quantize(x.numpy(), 1 / 4, 2, True), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y8, np_quantize(x.numpy(), 1 / 256, 8, True), rtol=1e-6,
                               atol=1e-7)


# -- weight quantizer ------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_shape,channel_axes", [
    ((3, 3, 4, 6), 1),  # Conv2D [kh, kw, cin, cout]
    ((3, 3, 4, 2), 2),  # DepthwiseConv2D [kh, kw, cin, multiplier]
    ((10, 5), 1),  # Dense [in, out]
])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantizer_per_channel(kernel_shape, channel_axes, bits):
    wq = WeightQuantizer(bits=bits, channel_axes=channel_axes)
    wq.build(kernel_shape)
    kernel = np.random.default_rng(bits).normal(0, 0.1, kernel_shape).astype(np.float32)
    np.testing.assert_array_equal(wq(kernel).numpy(), kernel)  # disabled: identity
    wq.initialize(kernel)
    axes = tuple(range(len(kernel_shape) - channel_axes))
    qn, qp = ops.quant_range(bits, signed=True)
    step = 2 * np.mean(np.abs(kernel), axis=axes) / np.sqrt(qp)
    assert wq.step_size.shape == kernel_shape[-channel_axes:]
    np.testing.assert_allclose(wq.step_size.numpy(), step, rtol=1e-5)
    wq.enabled = True
    step = wq.step_size.numpy()
    w = tf.constant(kernel)
    dy = np.random.default_rng(1).normal(size=kernel_shape).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(wq(w) * dy)
        q = wq(w).numpy()
    dw, dstep = tape.gradient(loss, [w, wq.step_size])
    np.testing.assert_allclose(q, np.round(np.clip(kernel / step, -qn, qp)) * step,
                               rtol=1e-6, atol=1e-8)
    v = kernel / step
    inside = (v >= -qn) & (v <= qp)
    np.testing.assert_array_equal(dw.numpy(), dy * inside)
    r = np.round(np.clip(v, -qn, qp))
    n = int(np.prod([kernel_shape[a] for a in axes]))  # elements per output channel
    expected = np.sum(dy * np.where(inside, r - v, r), axis=axes) / np.sqrt(n * qp)
    np.testing.assert_allclose(dstep.numpy(), expected, rtol=1e-4, atol=1e-6)


# -- argument errors -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(candidate_bits=(1, 4)), "candidate_bits=1"),
    (dict(candidate_bits=(4, 17)), "candidate_bits=17"),
    (dict(candidate_bits=(2.5,)), "candidate_bits=2.5"),
    (dict(candidate_bits=(True, 4)), "candidate_bits=True"),
    (dict(candidate_bits=()), r"candidate_bits=\(\)"),
    (dict(candidate_bits=None), "candidate_bits=None"),
    (dict(candidate_bits=(4, 2, 4)), "duplicates"),
    (dict(mode="mix"), "mode='mix'"),
    (dict(grad_scale="per_pixel"), "grad_scale='per_pixel'"),
])
def test_activation_quantizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match="Received:") as info:
        ActivationQuantizer(**kwargs)
    assert info.match(match)


def test_setting_a_bad_mode_and_selecting_a_non_candidate_raise():
    q = make_quantizer()
    with pytest.raises(ValueError, match="Received: mode='train'"):
        q.mode = "train"
    with pytest.raises(ValueError, match="Received: bits=3"):
        q.select(3)
    assert set(MODES) == {"float", "uniform", "mixture", "selected", "calibrate"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits=1"), (dict(bits=17), "bits=17"), (dict(bits="4"), "bits='4'"),
    (dict(channel_axes=3), "channel_axes=3"),
])
def test_weight_quantizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match="Received:") as info:
        WeightQuantizer(**kwargs)
    assert info.match(match)


def test_candidate_bits_are_sorted_and_signed_ranges_used():
    q = ActivationQuantizer(candidate_bits=(8, 2, 4), signed=True)
    assert q.candidate_bits == (2, 4, 8)
    assert q.uniform_index == 2  # the widest branch
    np.testing.assert_array_equal(q._qn, [2, 8, 128])
    np.testing.assert_array_equal(q._qp, [1, 7, 127])


@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_an_optimizer_step_never_takes_a_step_size_below_its_floor(kind):
    """SGD with a large learning rate pushes the step sizes far below zero; the constraint
    leaves them at ``MinimumStep().minimum`` (exactly), every other value as stepped."""
    import keras

    from metamix_tf.quant.quantizers import MinimumStep

    if kind == "activation":
        q = ActivationQuantizer(candidate_bits=(2, 4), mode="uniform")
        q.build((2, 4))
    else:
        q = WeightQuantizer(bits=4, enabled=True)
        q.build((3, 3))
    q.step_size.assign(np.linspace(0.5, 1.0, q.step_size.shape[0]).astype(np.float32))
    optimizer = keras.optimizers.SGD(1.0)
    grads = np.array([10.0] + [-1.0] * (q.step_size.shape[0] - 1), np.float32)
    optimizer.apply_gradients([(tf.constant(grads), q.step_size)])
    expected = np.linspace(0.5, 1.0, q.step_size.shape[0]).astype(np.float32) - grads
    expected[0] = MinimumStep().minimum
    np.testing.assert_array_equal(q.step_size.numpy(), expected)
    assert MinimumStep.from_config(MinimumStep(1e-6).get_config()).minimum == 1e-6


# -- the int8 conv kernels' rounding ---------------------------------------------------------
def _kernel_rounding_case(seed=0):
    """A quantizer over a 3-channel tensor that holds ``(A + noise) * unit``: integer
    accumulators ``A`` seen through float noise below a quarter unit, which moves some
    ``x / s`` across a rounding boundary."""
    rng = np.random.default_rng(seed)
    unit = np.array([0.01, 0.02, 0.005])
    step = 0.25
    scale = (unit / step).astype(np.float32)
    acc = rng.integers(-3000, 3000, SHAPE)
    x = ((acc + rng.uniform(-0.25, 0.25, SHAPE)) * unit).astype(np.float32)
    q = make_quantizer(signed=True, candidates=(8,), mode="selected", steps=[step])
    return q, x, acc, unit, scale


def test_kernel_rounding_rounds_the_recovered_accumulator_as_the_int8_kernel():
    from metamix_tf.export import kernels

    q, x, acc, unit, scale = _kernel_rounding_case()
    q.set_kernel_rounding(unit, scale)
    expected = np.clip(kernels.conv_requantize(acc, scale, 0), -128, 127) * 0.25
    np.testing.assert_array_equal(q(tf.constant(x), training=False).numpy(), expected)
    np.testing.assert_array_equal(tf.function(lambda v: q(v, training=False))(x).numpy(),
                                  expected)
    # training, another step, or no rounding set: LSQ's own round(x / s)
    plain = np_quantize(x, 0.25, 8, True)
    assert (plain != expected).any()  # the noise moved some across a boundary
    np.testing.assert_array_equal(q(tf.constant(x), training=True).numpy(), plain)
    q.step_size.assign([0.5])
    np.testing.assert_array_equal(q(tf.constant(x)).numpy(), np_quantize(x, 0.5, 8, True))
    q.step_size.assign([0.25])
    q.clear_kernel_rounding()
    np.testing.assert_array_equal(q(tf.constant(x)).numpy(), plain)


def test_kernel_rounding_is_in_the_config():
    q, x, _, unit, scale = _kernel_rounding_case()
    q.set_kernel_rounding(unit, scale, offset=-3)
    clone = ActivationQuantizer.from_config(q.get_config())
    assert clone.kernel_rounding == q.kernel_rounding
    clone.build(SHAPE)
    clone.set_weights(q.get_weights())
    np.testing.assert_array_equal(clone(tf.constant(x)).numpy(), q(tf.constant(x)).numpy())
    with pytest.raises(ValueError, match="positive and of one length"):
        q.set_kernel_rounding(unit, scale[:2])


def test_fixed_point_rounding_rounds_as_the_builtin_conv_kernel():
    """A searchable quantizer (its range gathered at the selected bits) with the builtin
    kernels' fixed-point requantization: their integers, not XNNPACK's, and in the config."""
    from metamix_tf.export import kernels

    _, x, acc, unit, scale = _kernel_rounding_case()
    q = make_quantizer(signed=True, candidates=(4, 8), mode="selected", steps=[1.0, 0.25])
    q.select(8)
    multipliers, shifts = kernels.builtin_conv_params(1.0, scale, 1.0)
    q.set_fixed_point_rounding(unit, multipliers, shifts)
    expected = kernels.builtin_conv_requantize(acc, multipliers, shifts, 0) * 0.25
    np.testing.assert_array_equal(q(tf.constant(x), training=False).numpy(), expected)
    assert (expected != np.clip(kernels.conv_requantize(acc, scale, 0), -128, 127) * 0.25).any()
    clone = ActivationQuantizer.from_config(q.get_config())
    assert clone.kernel_rounding == q.kernel_rounding
    clone.build(SHAPE)
    clone.set_weights(q.get_weights())
    np.testing.assert_array_equal(clone(tf.constant(x)).numpy(), expected)
    with pytest.raises(ValueError, match="of one length"):
        q.set_fixed_point_rounding(unit, multipliers[:2], shifts)


def test_input_rounding_multiplies_by_the_reciprocal_as_the_quantize_kernel():
    from metamix_tf.export import kernels

    step = np.float32(0.0411)
    rng = np.random.default_rng(0)
    x = ((rng.integers(-100, 100, SHAPE) + rng.choice([0.5, 0.4999999, 0.3], SHAPE))
         * step).astype(np.float32)
    q = make_quantizer(signed=True, candidates=(8,), mode="selected", steps=[step])
    plain = q(tf.constant(x)).numpy()
    q.set_input_rounding(step)
    expected = (kernels.quantize(x, step, 0) * step).astype(np.float32)
    np.testing.assert_array_equal(q(tf.constant(x)).numpy(), expected)
    assert (plain != expected).any()  # dividing by the step rounds some ties the other way
    clone = ActivationQuantizer.from_config(q.get_config())
    assert clone.kernel_rounding == q.kernel_rounding
