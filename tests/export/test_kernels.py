"""``metamix_tf.export.kernels`` against one-op int8 models run by LiteRT's default (XNNPACK)
kernels: every output integer equal, rounding ties included."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from metamix_tf.export import kernels, verify


def _fake_quant(x, scale: float, zero_point: int):
    """Int8 fake quant whose converted tensor has exactly ``scale`` and ``zero_point``."""
    return tf.quantization.fake_quant_with_min_max_vars(
        x, (-128 - zero_point) * scale, (127 - zero_point) * scale, num_bits=8)


def _int8_file(model, inputs: list, path) -> str:
    def representative():
        for i in range(0, len(inputs[0]), max(1, len(inputs[0]) // 8)):
            yield [x[i:i + 1] for x in inputs]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path = str(path)
    with open(path, "wb") as f:
        f.write(converter.convert())
    return path


def _run(path: str, integers: dict) -> tuple[np.ndarray, tuple, dict]:
    """Runs the file under XNNPACK on int8 inputs keyed by their scale (6 digits); returns
    the output integers, the output's (scale, zero point) and each input's by key."""
    interp = verify.interpreter(path)
    details = interp.get_input_details()
    for d in details:
        interp.resize_tensor_input(d["index"], integers[_key(d)].shape)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], integers[_key(d)].astype(np.int8))
    interp.invoke()
    out = interp.get_output_details()[0]
    return (interp.get_tensor(out["index"]).astype(np.int64), out["quantization"],
            {_key(d): d["quantization"] for d in details})


def _key(detail) -> float:
    return round(float(detail["quantization"][0]), 6)


@pytest.mark.parametrize("scales, zero_points", [
    ((0.1121, 0.1911, 0.0459), (0, 0, 0)),
    ((0.1908, 0.0761, 0.0962), (-17, 40, -128)),
    ((0.0250, 0.1556, 0.1169), (5, -128, 3)),
])
def test_add_equals_litert_on_every_input_pair(tmp_path, scales, zero_points):
    s_a, s_b, s_out = scales
    z_a, z_b, z_out = zero_points
    a_in, b_in = keras.Input((256,)), keras.Input((256,))
    fq = [keras.layers.Lambda(lambda x, s=s, z=z: _fake_quant(x, s, z))
          for s, z in zip(scales, zero_points, strict=True)]
    model = keras.Model([a_in, b_in], fq[2](keras.layers.Add()([fq[0](a_in), fq[1](b_in)])))
    q_a, q_b = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij")
    real = [((q_a - z_a) * s_a).astype(np.float32), ((q_b - z_b) * s_b).astype(np.float32)]
    path = _int8_file(model, real, tmp_path / "add.tflite")
    out, (file_s_out, file_z_out), file_in = _run(path, {round(s_a, 6): q_a,
                                                         round(s_b, 6): q_b})
    (file_s_a, file_z_a), (file_s_b, file_z_b) = file_in[round(s_a, 6)], file_in[round(s_b, 6)]
    assert (file_z_a, file_z_b, file_z_out) == zero_points
    expected = kernels.add(q_a, q_b, zero_points,
                           kernels.add_params(file_s_a, file_s_b, file_s_out))
    np.testing.assert_array_equal(out, expected)


def test_add_rounds_ties_up_and_conv_rounds_them_to_even(tmp_path):
    """Dyadic scales make exact ties: ADD sends them up (``floor(x + 1/2)``), the conv's
    float32 requantization to the even integer (``np.rint``)."""
    s = 2.0 ** -4
    params = kernels.add_params(s, s / 2, s)
    q_a, q_b = np.meshgrid(np.arange(-60, 60), np.arange(-60, 60, 1), indexing="ij")
    exact = q_a + q_b / 2
    out = kernels.add(q_a, q_b, (0, 0, 0), params)
    ties = exact != np.round(exact)
    np.testing.assert_array_equal(out[ties], np.floor(exact[ties] + 0.5))
    acc = np.arange(-41, 41, 2)  # odd accumulators times 1/2: every one a tie
    np.testing.assert_array_equal(kernels.conv_requantize(acc, 0.5, 0), np.rint(acc / 2))
    test_conv_equals_litert(tmp_path, input_scale=s, weight_scale=2.0 ** -3, output_scale=s)


def _conv_run(tmp_path, input_scale, weight_scale, output_scale, depthwise=False,
              delegates=True, spread=None):
    """A one-op int8 conv (3x3, 8 output channels, per-channel weight scales, bias, zero
    points) run by LiteRT: its output integers, the int32 accumulators computed from the
    file's own integers, and the file's ``(s_in, s_w, s_out, z_out)``. ``spread``: input
    integers within that of the zero point (small accumulators, for multipliers >= 1/2)."""
    rng = np.random.default_rng(0)
    channels, zero_in, zero_out = 8, -9, 11
    weight_scales = (np.full(channels, weight_scale) if weight_scale
                     else rng.uniform(0.01, 0.05, channels)).astype(np.float32)
    in_channels = channels if depthwise else 16
    weights = rng.integers(-7, 8, (3, 3, 1 if depthwise else in_channels, channels))
    bias = rng.normal(0, 0.05, channels).astype(np.float32)

    class Conv(keras.layers.Layer):
        def call(self, x):
            x = _fake_quant(x, input_scale, zero_in)
            kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                tf.constant((weights * weight_scales).astype(np.float32)),
                -127 * weight_scales, 127 * weight_scales, num_bits=8, narrow_range=True)
            y = (tf.nn.depthwise_conv2d(x, tf.reshape(kernel, (3, 3, channels, 1)),
                                        [1, 1, 1, 1], "VALID") if depthwise
                 else tf.nn.conv2d(x, kernel, 1, "VALID"))
            return _fake_quant(y + bias, output_scale, zero_out)

    inputs = keras.Input((6, 6, in_channels))
    model = keras.Model(inputs, Conv()(inputs))
    q_in = (rng.integers(-128, 128, (32, 6, 6, in_channels)) if spread is None
            else rng.integers(zero_in - spread, zero_in + spread + 1, (32, 6, 6, in_channels)))
    path = _int8_file(model, [((q_in - zero_in) * input_scale).astype(np.float32)],
                      tmp_path / "conv.tflite")
    if delegates:
        out, (file_s_out, file_z_out), file_in = _run(path, {round(input_scale, 6): q_in})
    else:
        out, (file_s_out, file_z_out), file_in = _run_builtin(path, q_in)
    ((file_s_in, file_z_in),) = file_in.values()
    assert (file_z_in, file_z_out) == (zero_in, zero_out)
    constants = verify.interpreter(path, delegates=False)
    (filters,) = [d for d in constants.get_tensor_details() if len(d["shape"]) == 4
                  and d["dtype"] == np.int8 and d["shape"][-1 if depthwise else 0] == channels
                  and d["quantization_parameters"]["scales"].size == channels]
    (bias_detail,) = [d for d in constants.get_tensor_details() if d["dtype"] == np.int32]
    file_scales = filters["quantization_parameters"]["scales"]
    stored = constants.get_tensor(filters["index"])
    if depthwise:  # 1HWC -> HWC1
        file_weights = stored[0][..., None]
        np.testing.assert_array_equal(file_weights[..., 0], weights[:, :, 0])
        acc = tf.nn.depthwise_conv2d(tf.constant(q_in - zero_in, tf.float64),
                                     tf.constant(file_weights, tf.float64), [1, 1, 1, 1],
                                     "VALID").numpy()
    else:  # OHWI -> HWIO
        file_weights = stored.transpose(1, 2, 3, 0)
        np.testing.assert_array_equal(file_weights, weights)  # the integers trained are stored
        acc = tf.nn.conv2d(tf.constant(q_in - zero_in, tf.float64),
                           tf.constant(file_weights, tf.float64), 1, "VALID").numpy()
    acc = np.rint(acc).astype(np.int64) + constants.get_tensor(bias_detail["index"])
    return out, acc, (file_s_in, file_scales, file_s_out, file_z_out)


def _run_builtin(path: str, q_in: np.ndarray) -> tuple[np.ndarray, tuple, dict]:
    """As :func:`_run` for one input, on LiteRT's builtin kernels (no XNNPACK)."""
    interp = verify.interpreter(path, delegates=False)
    (detail,) = interp.get_input_details()
    interp.resize_tensor_input(detail["index"], q_in.shape)
    interp.allocate_tensors()
    interp.set_tensor(detail["index"], q_in.astype(np.int8))
    interp.invoke()
    out = interp.get_output_details()[0]
    return (interp.get_tensor(out["index"]).astype(np.int64), out["quantization"],
            {0: detail["quantization"]})


def test_conv_equals_litert(tmp_path, input_scale=0.0173, weight_scale=None,
                            output_scale=0.0412):
    out, acc, (s_in, s_w, s_out, z_out) = _conv_run(tmp_path, input_scale, weight_scale,
                                                    output_scale)
    expected = kernels.conv_requantize(acc, kernels.conv_scale(s_in, s_w, s_out), z_out)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("scales, spread, shift", [
    ((0.0173, None, 0.0412), None, None),
    ((2.0 ** -4, 2.0 ** -3, 2.0 ** -4), 20, -2),
    ((2.0 ** -4, 2.0 ** -1, 2.0 ** -4), 3, 0),
    ((2.0 ** -4, 1.5, 2.0 ** -4), 1, 1),
])
def test_builtin_conv_equals_litert_builtin_kernels(tmp_path, depthwise, scales, spread,
                                                    shift):
    """The builtin kernels (which run INT4-filter convs) requantize in fixed point, two
    roundings half up; dyadic scales put many accumulators on ties, positive and negative
    (``s_in s_w / s_out = 1/8``: an eighth on a tie and another eighth at 0.375 of a unit,
    which the first rounding sends up), with right shifts 2 and 0 and a left shift 1.
    XNNPACK's float32 arithmetic gives other integers there."""
    out, acc, (s_in, s_w, s_out, z_out) = _conv_run(tmp_path, *scales, depthwise=depthwise,
                                                    delegates=False, spread=spread)
    multipliers, shifts = kernels.builtin_conv_params(s_in, s_w, s_out)
    if shift is not None:
        assert set(shifts.tolist()) == {shift}
    assert ((out > -128) & (out < 127)).mean() > 0.5  # mostly unsaturated
    np.testing.assert_array_equal(
        out, kernels.builtin_conv_requantize(acc, multipliers, shifts, z_out))
    xnnpack = kernels.conv_requantize(acc, kernels.conv_scale(s_in, s_w, s_out), z_out)
    assert (out != xnnpack).any()


def test_quantize_multiplier():
    assert kernels.quantize_multiplier(0.125) == (1 << 30, -2)
    assert kernels.quantize_multiplier(0.75) == (3 << 29, 0)
    assert kernels.quantize_multiplier(1 - 2.0 ** -40) == (1 << 30, 1)  # rounds up to 2^31
    assert kernels.quantize_multiplier(2.0 ** -40) == (0, 0)
    m, shift = kernels.quantize_multiplier(0.0173)
    assert abs(m * 2.0 ** (shift - 31) - 0.0173) <= 2.0 ** (shift - 32)


def test_add_differs_from_rounding_the_exact_sum():
    """Why a float Keras ADD cannot agree everywhere: the fixed-point multipliers move a few
    near-tie sums across the boundary (and the LiteRT test above would catch a kernel that
    rounded the exact sum instead)."""
    s_a, s_b, s_out = (np.float32(v) for v in (0.1908, 0.0761, 0.0962))
    q_a, q_b = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij")
    fixed_point = kernels.add(q_a, q_b, (0, 0, 0), kernels.add_params(s_a, s_b, s_out))
    exact = np.floor(q_a * np.float64(s_a) / s_out + q_b * np.float64(s_b) / s_out + 0.5)
    differ = fixed_point != np.clip(exact, -128, 127)
    assert differ.sum() == 16
    assert np.abs(fixed_point - exact)[differ].max() == 1


@pytest.mark.parametrize("scales, size", [((0.0173, 0.0041), 6), ((2.0 ** -4, 2.0 ** -4), 2)])
def test_mean_equals_litert(tmp_path, scales, size):
    """A global average pooling's int8 MEAN: the integer sum requantized with
    ``mean_scale`` (the second case: dyadic scales over 4 values, a quarter of the sums a
    tie, which the odd output zero point decides)."""
    s_in, s_out = scales
    inputs = keras.Input((size, size, 16))
    pooled = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Lambda(lambda x: _fake_quant(x, s_in, 3))(inputs))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: _fake_quant(x, s_out, -5))(pooled))
    q_in = np.random.default_rng(0).integers(-128, 128, (512, size, size, 16))
    path = _int8_file(model, [((q_in - 3) * s_in).astype(np.float32)], tmp_path / "mean.tflite")
    out, (file_s_out, file_z_out), file_in = _run(path, {round(s_in, 6): q_in})
    ((file_s_in, file_z_in),) = file_in.values()
    assert (file_z_in, file_z_out) == (3, -5)
    total = (q_in - 3).sum(axis=(1, 2))
    scale = kernels.mean_scale(file_s_in, file_s_out, size * size)
    np.testing.assert_array_equal(out, kernels.mean_requantize(total, scale, file_z_out))
    if size == 2:  # the conv's order (zero point after rounding) gets the ties wrong
        assert (out != kernels.conv_requantize(total, scale, file_z_out)).any()


@pytest.mark.parametrize("scale, zero_point", [(0.0173, 3), (2.0 ** -4, -5), (0.0411, 0)])
def test_quantize_equals_litert(tmp_path, scale, zero_point):
    """A float input quantized to int8 (read back through an exact ADD of the tensor with
    itself onto twice its scale): ``x * float32(1 / s)``, rounded; values at and within
    an ulp of ties, where dividing by ``s`` would differ."""
    inputs = keras.Input((64,))
    q = keras.layers.Lambda(lambda x: _fake_quant(x, scale, zero_point))(inputs)
    doubled = keras.layers.Lambda(lambda x: _fake_quant(x, 2 * scale, zero_point))(
        keras.layers.Add()([q, q]))
    rng = np.random.default_rng(0)
    x = ((rng.integers(-100, 100, (512, 64))
          + rng.choice([0.5, 0.4999999, 0.5000001, 0.3], (512, 64))) * scale).astype(np.float32)

    def representative():
        for i in range(8):
            yield [x[i:i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, doubled))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_output_type = tf.int8
    path = str(tmp_path / "quantize.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    interp = verify.interpreter(path)
    (detail,) = interp.get_input_details()
    interp.resize_tensor_input(detail["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(detail["index"], x)
    interp.invoke()
    out = interp.get_output_details()[0]
    assert out["quantization"][1] == zero_point
    np.testing.assert_array_equal(interp.get_tensor(out["index"]).astype(np.int64),
                                  kernels.quantize(x, scale, zero_point))
