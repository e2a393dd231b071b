"""metamix_tf.quant.native: the C++ quantizer kernels against TensorFlow's own ops.

Outputs and input gradients must be bit-identical to the TensorFlow definitions (the same
float32 operations in the same order). The step and probability sums are taken in another
order (float64 blocks), so they are compared exactly on inputs where every term and every
partial sum is exact in float32: steps that are powers of two, inputs on a grid of
``s / 8`` (so ``x / s`` is exact), ``dy`` small multiples of 1/4, few enough elements that
no sum needs more than 24 bits. Random inputs are covered in test_ops.py (``"native"``).
"""

import contextlib
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import graph_op_types

from metamix_tf.quant import native, ops

N = 8192 * 3 + 21  # three blocks of the kernels and a partial 16-element chunk


@pytest.fixture(scope="module")
def kernels():
    library = native.library()
    assert library is not None, ("the native kernels did not build: see the warning above "
                                 "(a C++ compiler, g++ or $CXX, is required)")
    return library


def _exact_case(signed, seed=0):
    """x on the grid s/8 over the whole range and beyond it (ties included: k + 1/2),
    dy multiples of 1/4 in [-2, 2]; s = 2^-3."""
    rng = np.random.default_rng(seed)
    s = np.float32(0.125)
    qn, qp = ops.quant_range(4, signed)
    x = (rng.integers(-8 * (qn + 3), 8 * (qp + 3), N) * s / 8).astype(np.float32)
    dy = (rng.integers(-8, 9, N) / 4).astype(np.float32)
    return x, dy, s, np.float32(qn), np.float32(qp)


def _graph_ops(fn, *args, enabled=True, jit_compile=False):
    """The op types of ``fn``'s graph (and its functions), traced inside
    :func:`native.enabled_in` unless ``enabled`` is false."""
    with native.enabled_in() if enabled else contextlib.nullcontext():
        graph = tf.function(fn, jit_compile=jit_compile).get_concrete_function(*args).graph
    return graph_op_types(graph)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_lsq_kernels_match_tensorflow_exactly(kernels, signed):
    x, dy, s, qn, qp = _exact_case(signed)
    v = x / s
    r = tf.round(tf.clip_by_value(v, -qn, qp)).numpy()
    inside = (v >= -qn) & (v <= qp)

    y = kernels.metamix_lsq_forward(x, s, qn, qp).numpy()
    dx, step_sum = kernels.metamix_lsq_backward(dy, x, s, qn, qp)

    np.testing.assert_array_equal(y, r * s)
    np.testing.assert_array_equal(dx.numpy(), np.where(inside, dy, 0))
    assert np.any(v == np.round(v) + 0.5)  # ties, rounded to even
    assert step_sum.numpy() == np.sum(dy.astype(np.float64) * np.where(inside, r - v, r))


def test_per_column_steps_match_tensorflow_exactly(kernels):
    """A step per column (x seen as [rows, P]: a depthwise kernel's [cin, multiplier]
    steps), the weight quantizers' case: per-column sums exact as above."""
    rng = np.random.default_rng(3)
    steps = 2.0 ** rng.integers(-5, -1, (6, 2)).astype(np.float32)  # powers of two
    qn, qp = ops.quant_range(4, True)
    x = (rng.integers(-8 * (qn + 3), 8 * (qp + 3), (3, 3, 6, 2)) * steps / 8).astype(np.float32)
    dy = (rng.integers(-8, 9, x.shape) / 4).astype(np.float32)
    v = x / steps
    r = tf.round(tf.clip_by_value(v, -qn, qp)).numpy()
    inside = (v >= -qn) & (v <= qp)

    flat = steps.reshape(-1)
    y = kernels.metamix_lsq_forward(x, flat, qn, qp).numpy()
    dx, step_sums = kernels.metamix_lsq_backward(dy, x, flat, qn, qp)

    np.testing.assert_array_equal(y, r * steps)
    np.testing.assert_array_equal(dx.numpy(), np.where(inside, dy, 0))
    expected = np.sum(dy.astype(np.float64) * np.where(inside, r - v, r), axis=(0, 1))
    np.testing.assert_array_equal(step_sums.numpy(), expected.reshape(-1))


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_mixture_kernels_match_tensorflow_exactly(kernels, signed):
    x, dy, _, _, _ = _exact_case(signed, seed=1)
    bits = (2, 4, 8)
    ranges = [ops.quant_range(b, signed) for b in bits]
    qns = np.array([q[0] for q in ranges], np.float32)
    qps = np.array([q[1] for q in ranges], np.float32)
    steps = np.array([0.5, 0.125, 0.125], np.float32)  # powers of two, >= the grid of x
    probs = np.array([0.25, 0.5, 0.25], np.float32)

    y = kernels.metamix_mixture_forward(x, steps, probs, qns, qps).numpy()
    dx, prob_sums, step_sums = kernels.metamix_mixture_backward(dy, x, steps, probs, qns, qps)

    y_ref, gate = np.zeros_like(x), np.zeros_like(x)
    for k in range(len(bits)):
        v = x / steps[k]
        r = tf.round(tf.clip_by_value(v, -qns[k], qps[k])).numpy()
        inside = (v >= -qns[k]) & (v <= qps[k])
        y_ref += probs[k] * (r * steps[k])
        gate += np.where(inside, probs[k], np.float32(0))
        assert prob_sums.numpy()[k] == np.sum(dy.astype(np.float64) * r)
        assert step_sums.numpy()[k] == np.sum(dy.astype(np.float64) * np.where(inside, r - v, r))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx.numpy(), dy * gate)


def test_forward_is_bit_identical_on_random_inputs(kernels):
    """Random float32 inputs (no exact structure; zeros of both signs and values that round
    to -0): forward and input gradient equal TensorFlow's eager ops bit for bit, the step
    sum its float64 value to float32."""
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 3.0, N).astype(np.float32)
    x[:64] = np.array([0.0, -0.0, -1e-3, -0.01] * 16, np.float32)  # round to -0 in x / s
    dy = rng.normal(size=N).astype(np.float32)
    s, qn, qp = np.float32(0.0371), np.float32(8), np.float32(7)
    v = tf.constant(x) / s
    c = tf.clip_by_value(v, -qn, qp)
    y = kernels.metamix_lsq_forward(x, s, qn, qp).numpy()
    np.testing.assert_array_equal(y.view(np.int32), (tf.round(c) * s).numpy().view(np.int32))
    dx, step_sum = kernels.metamix_lsq_backward(dy, x, s, qn, qp)
    inside = (v == c).numpy()
    np.testing.assert_array_equal(dx.numpy().view(np.int32),
                                  np.where(inside, dy, np.float32(0)).view(np.int32))
    terms = (dy * (tf.round(c) - tf.where(v == c, v, 0.0))).numpy()  # float32 terms
    assert step_sum.numpy() == np.float32(np.sum(terms.astype(np.float64)))


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_mixture_is_bit_identical_on_random_inputs(kernels, signed):
    """The mixture kernels (16 lanes as vector types, their own rounding) on random float32
    inputs, zeros of both signs and values just below zero included: forward and input
    gradient equal TensorFlow's eager ops bit for bit, the sums their float64 values to
    float32."""
    rng = np.random.default_rng(4)
    x = rng.normal(0.5, 2.0, N).astype(np.float32)
    x[:64] = np.array([0.0, -0.0, -1e-3, -0.04] * 16, np.float32)
    dy = rng.normal(size=N).astype(np.float32)
    ranges = [ops.quant_range(b, signed) for b in (2, 3, 8)]
    qns = np.array([q[0] for q in ranges], np.float32)
    qps = np.array([q[1] for q in ranges], np.float32)
    steps = np.array([0.731, 0.0919, 0.0213], np.float32)
    probs = np.array([0.2, 0.45, 0.35], np.float32)

    y = kernels.metamix_mixture_forward(x, steps, probs, qns, qps).numpy()
    dx, prob_sums, step_sums = kernels.metamix_mixture_backward(dy, x, steps, probs, qns, qps)

    y_ref, gate = tf.zeros_like(x), tf.zeros_like(x)
    for k in range(len(steps)):
        v = tf.constant(x) / steps[k]
        c = tf.clip_by_value(v, -qns[k], qps[k])
        y_ref += probs[k] * (tf.round(c) * steps[k])
        gate += tf.where(v == c, probs[k], 0.0)
        for got, terms in ((prob_sums[k], dy * tf.round(c)),
                           (step_sums[k], dy * (tf.round(c) - tf.where(v == c, v, 0.0)))):
            assert got.numpy() == np.float32(np.sum(terms.numpy().astype(np.float64)))
    np.testing.assert_array_equal(y.view(np.int32), y_ref.numpy().view(np.int32))
    np.testing.assert_array_equal(dx.numpy().view(np.int32), (dy * gate).numpy().view(np.int32))


def test_non_finite_inputs_as_tensorflow(kernels):
    """A NaN stays NaN (a diverging run must not be hidden by the quantizer) and +-inf
    clip, in the forward and in every gradient, as the TensorFlow ops do."""
    x = np.array([np.nan, np.inf, -np.inf, 1.0] * 5, np.float32)
    dy = np.ones_like(x)
    for where in ("xla", "native"):
        with native.enabled_in() if where == "native" else contextlib.nullcontext():
            y, grads = _forward_backward(x, dy, np.float32(0.5))
        np.testing.assert_array_equal(y, [np.nan, 7.5, 0.0, 1.0] * 5)
        np.testing.assert_array_equal(grads[0], [0.0, 0.0, 0.0, 1.0] * 5)
        assert np.isnan(grads[1])


def _forward_backward(x, dy, step):
    @tf.function
    def run(x, step):
        with tf.GradientTape() as tape:
            tape.watch([x, step])
            y = ops.lsq_quantize(x, step, 0.0, 15.0)
        return y, tape.gradient(y, [x, step], output_gradients=tf.constant(dy))

    y, grads = run(tf.constant(x), tf.constant(step))
    return y.numpy(), [g.numpy() for g in grads]


def test_training_steps_trace_the_native_kernels_and_nothing_else_does(kernels):
    x = tf.TensorSpec([2, 8], tf.float32)

    def quantize(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.lsq_quantize(x, tf.constant(0.1), 0.0, 15.0)
        return y, tape.gradient(y, x)

    def mixture(x):
        return ops.lsq_mixture(x, tf.constant([0.3, 0.1]), tf.constant([0.5, 0.5]),
                               [0.0, 0.0], [3.0, 15.0])

    assert {"MetamixLsqForward", "MetamixLsqBackward"} <= _graph_ops(quantize, x)
    assert "MetamixMixtureForward" in _graph_ops(mixture, x)
    # Outside enabled_in (model.export, the TFLite conversion, a user's fit): TF ops only.
    assert not any(name.startswith("Metamix") for name in _graph_ops(quantize, x,
                                                                     enabled=False))
    # Inside an XLA-compiled step: the XLA kernels (XLA cannot compile a custom op).
    assert not any(name.startswith("Metamix") for name in _graph_ops(quantize, x,
                                                                     jit_compile=True))
    # A step per channel of the last axis (the weight quantizers) runs natively too; one
    # broadcast over another axis keeps the XLA kernels.
    assert "MetamixLsqForward" in _graph_ops(
        lambda x: ops.lsq_quantize(x, tf.fill([1, 8], 0.1), 0.0, 15.0), x)
    assert not any(name.startswith("Metamix") for name in _graph_ops(
        lambda x: ops.lsq_quantize(x, tf.fill([2, 1], 0.1), 0.0, 15.0), x))


def _quantizer_of_activation(activation, mixture):
    """``fn(x, step, steps, probs)``: the quantizer (a 4-bit branch or a three-branch
    mixture) of ``activation(x)``."""

    def fn(x, step, steps, probs):
        a = activation(x)
        if mixture:
            return ops.lsq_mixture(a, steps, probs, [0.0, 0.0, 0.0], [3.0, 15.0, 255.0])
        return ops.lsq_quantize(a, step, 0.0, 15.0)

    return fn


@pytest.mark.parametrize("mixture", [False, True], ids=["quantize", "mixture"])
@pytest.mark.parametrize("activation", [tf.nn.relu6, tf.nn.relu], ids=["relu6", "relu"])
def test_folded_activation_gives_the_unfolded_values_exactly(kernels, monkeypatch,
                                                             activation, mixture):
    """A ReLU / ReLU6 folded into the native quantizer after it: output and every gradient
    bit for bit those of the activation op followed by the quantizer (the same float32
    operations per element and the same summation order), and no activation gradient op in
    the graph. Inputs cover both sides of 0 and 6, both bounds exactly, NaN and +-inf."""
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 4.0, N).astype(np.float32)
    x[:8] = [0.0, 6.0, -0.0, np.nan, np.inf, -np.inf, 5.999999, 1e-30]
    dy = rng.normal(size=N).astype(np.float32)
    inputs = (x, np.float32(0.37), np.array([0.9, 0.37, 0.05], np.float32),
              np.array([0.2, 0.5, 0.3], np.float32))
    grad_op = {tf.nn.relu6: "Relu6Grad", tf.nn.relu: "ReluGrad"}[activation]
    _assert_fold_is_exact(monkeypatch, _quantizer_of_activation(activation, mixture), inputs,
                          dy, grad_op)


def _assert_fold_is_exact(monkeypatch, fn, inputs, dy, grad_op):
    """``fn(*inputs)`` and its gradients for ``dy``, traced with the activation folded into
    the quantizer and with ``ops._folded_input`` off: ``grad_op`` (the activation's
    gradient) only in the second graph, every value equal (NaN where NaN)."""

    def forward_backward(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = fn(*args)
        return y, tape.gradient(y, args, output_gradients=tf.constant(dy))

    specs = [tf.TensorSpec(np.shape(v), tf.float32) for v in inputs]
    with native.enabled_in():
        y, grads = tf.function(forward_backward)(*inputs)
    assert grad_op not in _graph_ops(forward_backward, *specs)
    monkeypatch.setattr(ops, "_folded_input", lambda x: (x, "none"))
    with native.enabled_in():
        y_ref, grads_ref = tf.function(forward_backward)(*inputs)
    assert grad_op in _graph_ops(forward_backward, *specs)

    np.testing.assert_array_equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_array_equal(g, g_ref)
    return y


def test_bad_shapes_raise_one_line_errors(kernels):
    with pytest.raises(tf.errors.InvalidArgumentError, match="divides x's size"):
        kernels.metamix_lsq_forward(tf.zeros([4]), tf.ones([3]), 0.0, 15.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be a scalar"):
        kernels.metamix_lsq_forward(tf.zeros([4]), 1.0, tf.zeros([2]), 15.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        kernels.metamix_lsq_backward(tf.zeros([3]), tf.zeros([4]), 1.0, 0.0, 15.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="number of branches"):
        kernels.metamix_mixture_forward(tf.zeros([4]), tf.ones([9]), tf.ones([9]),
                                        tf.zeros([9]), tf.ones([9]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must have shape"):
        kernels.metamix_mixture_forward(tf.zeros([4]), tf.ones([2]), tf.ones([3]),
                                        tf.zeros([2]), tf.ones([2]))


def test_disabled_by_environment_variable(tmp_path):
    """METAMIX_TF_NATIVE_OPS=0: no library, the XLA kernels run (checked in a fresh process:
    the library is loaded once per process)."""
    code = ("from metamix_tf.quant import native; import sys; "
            "sys.exit(0 if native.library() is None else 1)")
    env = {**os.environ, "METAMIX_TF_NATIVE_OPS": "0"}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path).returncode == 0


def test_cpu_level_set_by_environment_variable(monkeypatch):
    monkeypatch.setenv("METAMIX_TF_NATIVE_ARCH", "x86-64-v3")
    assert [f for f in native.build_flags() if f.startswith("-march")] == ["-march=x86-64-v3"]
    monkeypatch.setenv("METAMIX_TF_NATIVE_ARCH", "none")
    assert not [f for f in native.build_flags() if f.startswith("-march")]


@pytest.mark.parametrize("arch", ["x86-64-v3", "none"])
def test_kernels_built_for_another_cpu_level(arch):
    """The exactness tests above, on kernels built with METAMIX_TF_NATIVE_ARCH=arch: the
    mixture kernels' vectors are 16 lanes wide with AVX-512, 8 with AVX2 (x86-64-v3), 4
    without (none), and this machine's own build runs only one of them. In a fresh
    process: a process loads one build of the kernels."""
    if platform.machine() not in ("x86_64", "AMD64") or native._compiler() is None:
        pytest.skip("x86-64 levels need an x86-64 CPU and a C++ compiler")
    if arch == "x86-64-v3" and not native._cpu_flags() >= native._X86_64_V3:
        pytest.skip("this CPU has no AVX2")
    if f"-march={arch}" in native.build_flags():
        pytest.skip(f"{arch} is this machine's own build")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "exactly or bit_identical or non_finite"], capture_output=True, text=True,
        env={**os.environ, "METAMIX_TF_NATIVE_ARCH": arch},
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_load_builds_a_given_source_and_reports_its_first_error(tmp_path, monkeypatch):
    """native.load(source) compiles that file (as benchmarks/native_kernels.py does with
    older sources); a build that fails raises with the compiler's first error line and
    caches nothing."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("METAMIX_TF_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.cc"
    source.write_text("int main() { return undeclared_name; }\n")
    with pytest.raises(RuntimeError, match="undeclared_name"):
        native.load(str(source))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".so"]


@pytest.mark.parametrize("mixture", [False, True], ids=["quantize", "mixture"])
def test_activation_folds_through_a_zero_padding(kernels, monkeypatch, mixture):
    """ReLU6 -> zero padding (Keras' ZeroPadding2D) -> quantizer: the quantizer runs on the
    pre-activation and its output is padded (q(0) = 0). Output and input gradient bit for bit
    those of the unfolded ops; the step sums are the same exact terms without the padding's
    zeros (inputs on a grid that keeps every sum exact in float64, so they are equal too);
    no ReLU6 gradient op."""
    rng = np.random.default_rng(5)
    shape = (2, 6, 6, 4)
    x = (rng.integers(-32, 160, shape) / 16).astype(np.float32)  # both sides of 0 and 6
    x.flat[:2] = [0.0, 6.0]
    dy = (rng.integers(-8, 9, (2, 7, 7, 4)) / 4).astype(np.float32)
    inputs = (x, np.float32(0.5), np.array([1.0, 0.5, 0.0625], np.float32),
              np.array([0.25, 0.5, 0.25], np.float32))
    quantize = _quantizer_of_activation(
        lambda t: tf.pad(tf.nn.relu6(t), [[0, 0], [0, 1], [0, 1], [0, 0]]), mixture)
    y = _assert_fold_is_exact(monkeypatch, quantize, inputs, dy, "Relu6Grad")
    assert y.shape == (2, 7, 7, 4)


@pytest.mark.parametrize("mixture", [False, True], ids=["quantize", "mixture"])
def test_outputs_written_over_their_inputs_are_exact(kernels, mixture):
    """Inside a graph, each op writes its output over its first input when nothing else
    reads that buffer (x of a forward, dy of a backward, computed in the graph here): the
    same bits as the eager calls, whose inputs are kept and never written over."""
    x, dy, s, qn, qp = _exact_case(signed=True, seed=5)
    if mixture:
        params = (np.array([0.5, 0.125], np.float32), np.array([0.3, 0.7], np.float32),
                  np.array([2.0, 8.0], np.float32), np.array([1.0, 7.0], np.float32))
        forward, backward = kernels.metamix_mixture_forward, kernels.metamix_mixture_backward
    else:
        params = (s, qn, qp)
        forward, backward = kernels.metamix_lsq_forward, kernels.metamix_lsq_backward

    def copy(t):  # a buffer of its own (Grappler folds `t * 1.0` away, not this)
        return tf.reverse(tf.reverse(t, [0]), [0])

    @tf.function
    def in_graph(x, dy):
        x_copy, dy_copy = copy(x), copy(dy)
        return (forward(copy(x_copy), *params, activation="relu6"),  # written over
                backward(dy_copy, x_copy, *params, activation="relu6"))  # over dy_copy

    y, grads = in_graph(x, dy)
    np.testing.assert_array_equal(y.numpy(), forward(x, *params, activation="relu6").numpy())
    for got, want in zip(grads, backward(dy, x, *params, activation="relu6"), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
