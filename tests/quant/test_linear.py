"""metamix_tf.quant.ops.lsq_linear: a quantized layer on the model's input, whose step size
takes its gradient from a forward of the layer's linear op instead of its input gradient.

The step gradient is the same sum taken in another order, so it is compared exactly on
inputs where every product and partial sum is exact in float32 (steps that are powers of
two, inputs on a grid of ``s / 8``, kernels and ``dy`` small multiples of 1/2), and within
a bound derived from the number of terms on random ones.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import graph_op_types, three_conv_model

import metamix_tf as mm
from metamix_tf.quant import native, ops

STEP = np.float32(0.125)
QN, QP = ops.quant_range(4, signed=True)
LINEARS = {
    "conv_stride_2": (lambda q, k: tf.nn.conv2d(q, k, 2, "SAME"), (2, 6, 6, 3), (3, 3, 3, 4)),
    "depthwise": (lambda q, k: tf.nn.depthwise_conv2d(q, k, [1, 1, 1, 1], "VALID"),
                  (2, 5, 5, 3), (3, 3, 3, 2)),
    "matmul": (tf.matmul, (4, 12), (12, 5)),
}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert native.library() is not None, "the native kernels did not build"


def _exact_case(x_shape, kernel_shape, y_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.integers(-8 * (QN + 3), 8 * (QP + 3), x_shape) * STEP / 8).astype(np.float32)
    kernel = (rng.integers(-2, 3, kernel_shape) / 2).astype(np.float32)
    dy = (rng.integers(-2, 3, y_shape) / 2).astype(np.float32)
    return x, kernel, dy


def _values_and_grads(linear, x, kernel, dy, fused: bool):
    """``(y, dL/ds, dL/dkernel)`` with ``L = sum(dy * y)``, traced on the native kernels:
    through :func:`ops.lsq_linear` (``fused``) or the composition of the quantizer and
    ``linear``."""
    step, k = tf.Variable(STEP), tf.Variable(kernel)

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            if fused:
                y = ops.lsq_linear(x, step, QN, QP, 1.0, k, linear)
            else:
                y = linear(ops.lsq_quantize(x, step, QN, QP, 1.0), k)
        return (y, *tape.gradient(y, [step, k], output_gradients=dy))

    with native.enabled_in():
        return [t.numpy() for t in run(tf.constant(x))]


@pytest.mark.parametrize("name", list(LINEARS))
def test_values_and_gradients_are_the_compositions_exactly(name):
    linear, x_shape, kernel_shape = LINEARS[name]
    y_shape = linear(tf.zeros(x_shape), tf.zeros(kernel_shape)).shape
    x, kernel, dy = _exact_case(x_shape, kernel_shape, y_shape)
    fused = _values_and_grads(linear, x, kernel, dy, fused=True)
    plain = _values_and_grads(linear, x, kernel, dy, fused=False)
    for got, want in zip(fused, plain, strict=True):
        np.testing.assert_array_equal(got, want)
    assert fused[1] != 0  # the step has a gradient to compare


def test_step_gradient_on_random_inputs_within_the_summation_bound():
    """Random inputs: the two sums of the same N = 4 * 12 * 5 products differ by float32
    rounding only, at most ~ N * 2^-24 of the sum of their magnitudes."""
    rng = np.random.default_rng(1)
    linear, x_shape, kernel_shape = LINEARS["matmul"]
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    kernel = rng.normal(0, 1, kernel_shape).astype(np.float32)
    dy = rng.normal(0, 1, (4, 5)).astype(np.float32)
    fused = _values_and_grads(linear, x, kernel, dy, fused=True)
    plain = _values_and_grads(linear, x, kernel, dy, fused=False)
    np.testing.assert_array_equal(fused[0], plain[0])
    np.testing.assert_array_equal(fused[2], plain[2])
    tangent = ops._step_tangent(tf.constant(x), STEP, float(QN), float(QP)).numpy()
    magnitude = float(np.sum(np.abs(dy)[:, None, :] * np.abs(tangent[:, :, None] * kernel)))
    bound = 2 * np.prod(x_shape) * kernel_shape[1] * 2.0**-24 * magnitude
    assert abs(fused[1] - plain[1]) <= bound


def test_a_step_per_channel_is_refused():
    with pytest.raises(ValueError, match=r"`step` must be a scalar"):
        ops.lsq_linear(tf.ones([2, 3]), tf.ones([3]), QN, QP, 1.0, tf.ones([3, 4]), tf.matmul)


def test_takes_no_gradient_only_for_data():
    variable = tf.Variable(2.0)

    @tf.function
    def check(x):
        scaled = x * 0.5 - 1.0  # a rescaling layer: still data
        assert ops.takes_no_gradient(x) and ops.takes_no_gradient(scaled)
        assert not ops.takes_no_gradient(scaled * variable)
        return scaled

    check(tf.ones([2, 3]))
    assert not ops.takes_no_gradient(tf.ones([2]))  # eagerly: nothing to walk


def _selected_model():
    keras.utils.set_random_seed(0)
    model = mm.apply(three_conv_model(), mm.QuantConfig(candidate_bits=(2, 4, 8)))
    images = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    mm.calibrate(model, images)
    mm.select_bits(model, {layer.name: 4 for layer in mm.quant_layers(model)
                           if layer.input_quantizer.searchable})
    mm.enable_weight_quantization(model)
    mm.set_mode(model, "selected")
    return model, images, np.arange(8) % 4


def test_the_training_step_skips_the_first_layers_input_gradient(monkeypatch):
    """In a training step the first conv (on the model's input) runs as lsq_linear: its
    input gradient is not in the graph, the other convs' are, and every gradient is the
    composition's (the first layer's step up to the order of its sum, the rest exactly)."""
    model, images, labels = _selected_model()
    variables = mm.variable_groups(model).weights_and_steps

    def gradients():
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True))
            return tape.gradient(loss, variables)

        with native.enabled_in():
            graph = step.get_concrete_function(images, labels).graph
            grads = [tf.convert_to_tensor(g).numpy() for g in step(images, labels)]
            return graph_op_types(graph), graph, grads

    def used_input_gradients(graph):  # those left unread are pruned before the step runs
        return sorted(op.name.split("/")[-3] for op in graph.get_operations()
                      if op.type == "Conv2DBackpropInput" and op.outputs[0].consumers())

    types, graph, fused = gradients()
    assert "MetamixLsqForward" in types
    assert used_input_gradients(graph) == ["c2_1", "c3_1"]
    monkeypatch.setattr(ops, "takes_no_gradient", lambda x: False)
    _, graph, plain = gradients()
    assert used_input_gradients(graph) == ["c1_1", "c2_1", "c3_1"]
    first_step = mm.quant_layers(model)[0].input_quantizer.step_size
    for variable, got, want in zip(variables, fused, plain, strict=True):
        if variable is first_step:  # another order of the same sum (exact above where
            np.testing.assert_allclose(got, want, rtol=1e-3)  # float32 is; 6 ulps here)
        else:
            np.testing.assert_array_equal(got, want, err_msg=variable.path)
