"""Tests for metamix_tf.export: grids, BatchNorm folding, the inference graph, TFLite export
(int8 / float16 / float32) checked with the LiteRT interpreter, the encodings sidecar, and
the messages for bad input.

The main test trains a tiny mixed-precision network (activations at 2, 3, 4 and 8 bits,
signed and unsigned inputs, a residual add, zero padding, max pooling, dropout) for a few
steps, exports it and compares the int8 model with the Keras fake-quantized model.

Logit tolerance of the int8 model (documented here, asserted below). The Keras model is
wrapped as the pipeline wraps it: 8-bit output quantizers on the residual-add inputs, the
pooling input and the logits (``QuantConfig.output_bits``), and biases moved onto the int32
grid a TFLite conv stores them on (``graph.snap_biases``, the last step of weight training).
Then the int8 model rounds every tensor as the Keras model does; what is left is float32
summation order in Keras, which can move a value that lies within ~1e-6 of a rounding
boundary. Measured on this network: max |logit difference| 0.0 and every quantized layer's
input integers equal (TF 2.21, ai-edge-litert 2.3, XNNPACK). The test asserts 100% top-1
agreement, ``max |logit difference| <= 0.01 * max |reference logit|`` and that at least
99.9% of each quantized layer's input integers equal the Keras model's. Without the output
quantizers and the bias snap, the same network measured max 2.58, mean 0.54 (logits up to
11.9): each int8-only rounding sometimes moves a value of a 2- to 4-bit layer to the next
grid point, and the difference travels on.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import metamix_tf as mm
from metamix_tf import config as config_lib
from metamix_tf.export import aimet, encodings, graph, grids, integer_io, run, tflite, verify
from metamix_tf.export.layers import FakeQuant

L = keras.layers
BITS = {"dw": 2, "project": 3, "expand": 4, "project2": 8, "head": 2}
SIGNED = {"stem": True, "dw": False, "project": False, "expand": True, "project2": False,
          "head": True, "logits": False}
NUM_CLASSES = 4
LABELS = ["top-left", "top-right", "bottom-left", "bottom-right"]


# ---------------------------------------------------------------------------------------------
# A tiny trained mixed-precision model
# ---------------------------------------------------------------------------------------------


def _tiny_float_model() -> keras.Model:
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(momentum=0.8, name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="dw_pad")(x)
    x = L.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw")(x)
    x = L.BatchNormalization(momentum=0.8, name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu")(x)
    t = L.Conv2D(8, 1, use_bias=False, name="project")(x)
    # linear (no ReLU): read by expand (quantized, signed) and by add (float)
    t = L.BatchNormalization(momentum=0.8, name="project_bn")(t)
    y = L.Conv2D(16, 1, use_bias=False, name="expand")(t)
    y = L.BatchNormalization(momentum=0.8, name="expand_bn")(y)
    y = L.ReLU(name="expand_relu")(y)
    y = L.Conv2D(8, 1, use_bias=False, name="project2")(y)
    y = L.BatchNormalization(momentum=0.8, name="project2_bn")(y)
    a = L.Add(name="add")([t, y])
    z = L.Conv2D(16, 1, name="head")(a)  # bias, no BatchNorm
    z = L.ReLU(name="head_relu")(z)
    z = L.MaxPooling2D(2, name="pool")(z)
    z = L.GlobalAveragePooling2D(name="gap")(z)
    z = L.Dropout(0.1, name="drop")(z)
    out = L.Dense(NUM_CLASSES, name="logits")(z)
    return keras.Model(inp, out, name="tiny")


def _data(n: int, seed: int):
    """Four classes: a bright quadrant on noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.normal(0.0, 0.35, (n, 16, 16, 3))
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, 8 * r:8 * r + 8, 8 * q:8 * q + 8, :] += 0.9
    return np.clip(images, -1, 1).astype(np.float32), labels.astype(np.int32)


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fit(model, images, labels, steps: int, lr: float):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels, batch_size=32, epochs=max(1, steps * 32 // len(images)),
              verbose=0, shuffle=True)


def _train_tiny(seed: int = 0, bits: dict | None = None, output_bits: int | None = 8,
                snap: bool = True) -> tuple:
    keras.utils.set_random_seed(seed)
    train_x, train_y = _data(512, seed)
    test_x, test_y = _data(128, seed + 1)
    float_model = _tiny_float_model()
    _fit(float_model, train_x, train_y, steps=128, lr=5e-3)
    model = mm.apply(float_model, mm.QuantConfig(candidate_bits=(2, 3, 4, 8),
                                                 output_bits=output_bits))
    mm.calibrate(model, train_x[:128])
    mm.select_bits(model, bits or BITS)
    mm.enable_weight_quantization(model)
    for q in mm.activation_quantizers(model):
        q.alpha.trainable = False  # bits fixed by hand: no search
    _fit(model, train_x, train_y, steps=64, lr=2e-3)
    if snap:
        graph.snap_biases(model)  # as the pipeline does after weight training
    return model, (train_x, train_y), (test_x, test_y)


_CACHE: dict = {}


def _trained(output_bits: int | None = 8):
    if output_bits not in _CACHE:
        _CACHE[output_bits] = _train_tiny(output_bits=output_bits)
    return _CACHE[output_bits]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, (train_x, _), (test_x, test_y) = _trained()
    out = str(tmp_path_factory.mktemp("export"))
    report = run.export_model(model, out, name="tiny", calibration_data=train_x,
                              eval_images=test_x, eval_labels=test_y,
                              bits_info={"searcher": "hand", "gbops": 0.001},
                              latency_rounds=1, latency_runs=3, log=lambda _: None,
                              integer_io=("uint8", "int8"), labels=LABELS,
                              normalisation="x = image (already in [-1, 1])")
    plan = graph.plan(model, calibration_data=train_x)
    return report, out, plan


# ---------------------------------------------------------------------------------------------
# Grids and folding (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,signed,zero_point,qmin,qmax", [
    (2, True, 126, -2, 1), (3, True, 124, -4, 3), (4, True, 120, -8, 7),
    (8, True, 0, -128, 127), (2, False, 124, 0, 3), (3, False, 120, 0, 7),
    (4, False, 112, 0, 15), (8, False, -128, 0, 255),
])
def test_activation_grid_is_the_lsq_grid_in_an_int8(bits, signed, zero_point, qmin, qmax):
    g = grids.activation_grid(bits, signed, 0.25)
    assert (g.scale, g.zero_point, g.qmin, g.qmax) == (0.25, zero_point, qmin, qmax)
    assert g.fits_int8
    assert g.int8_max == qmax  # int8 saturation is the b-bit top: no clamp op there
    assert g.clamped == (bits < 8)
    old = grids.activation_grid(bits, signed, 0.25, saturate=False)
    assert old.zero_point == (0 if signed else -128) and (old.qmin, old.qmax) == (qmin, qmax)


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (4, True), (8, False)])
def test_fake_quant_range_gives_the_converter_the_saturating_zero_point(bits, signed):
    """tf.quantization.fake_quant_with_min_max_vars nudges [int8_min, int8_max] * scale to
    the same range (the converter's scale and zero point), and saturates at qmax."""
    g = grids.activation_grid(bits, signed, 0.37)
    lo, hi = np.float32(g.int8_min * g.scale), np.float32(g.int8_max * g.scale)
    x = tf.constant([-1e3, -g.scale * 0.5, 0.0, g.qmax * g.scale, 1e3], tf.float32)
    y = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8).numpy()
    assert y[0] == pytest.approx(lo, rel=1e-6) and y[-1] == pytest.approx(hi, rel=1e-6)
    assert y[-1] == pytest.approx(g.qmax * g.scale, rel=1e-6)
    # the converter's zero point: uint8 round(-lo / scale), minus 128 for int8
    assert round(-float(lo) / ((float(hi) - float(lo)) / 255)) - 128 == g.zero_point


def test_activation_grid_wider_than_8_bits_does_not_fit_int8():
    assert not grids.activation_grid(16, True, 0.01).fits_int8


def test_calibrated_grid_holds_zero_exactly():
    g = grids.calibrated_grid(-1.3, 4.1)
    assert g.qmin <= 0 <= g.qmax and g.fits_int8
    assert g.qmin * g.scale <= -1.3 + g.scale and g.qmax * g.scale >= 4.1 - g.scale
    assert grids.calibrated_grid(0.5, 2.0).qmin == 0  # range widened to include zero


def _round_half_up(x):
    return np.floor(x + 0.5)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
def test_shared_grid_requantization_is_exact(bits, signed):
    first = grids.activation_grid(bits, signed, 0.37)
    # a quantizer is unsigned only after a ReLU-like op: its tensor calibrates non-negative
    shared, k = grids.shared_grid(first, max_abs=10.0, signed=signed)
    assert k % 2 == 1 and shared.scale == pytest.approx(first.scale / k)
    assert grids.is_exact_requantization(shared, first)
    x = np.random.default_rng(0).uniform(-3 if signed else 0, 3, 100_000)
    direct = np.clip(_round_half_up(x / first.scale), first.qmin, first.qmax)
    fine = np.clip(_round_half_up(x / shared.scale), shared.qmin, shared.qmax)
    twice = np.clip(_round_half_up(fine * shared.scale / first.scale), first.qmin, first.qmax)
    np.testing.assert_array_equal(direct, twice)


def test_shared_grid_covers_the_float_range():
    first = grids.activation_grid(4, True, 0.1)
    shared, k = grids.shared_grid(first, max_abs=5.0, signed=True)
    assert shared.int8_max * shared.scale >= 5.0 - 1e-6
    assert shared.int8_max * shared.scale >= first.max_value


def test_fold_batch_norm_matches_conv_then_batch_norm():
    rng = np.random.default_rng(0)
    integers = rng.integers(-8, 8, (5, 4)).astype(np.float64)  # [in, out]
    step = rng.uniform(0.01, 0.1, 4)
    gamma = np.array([1.5, -0.7, 0.0, 0.3])
    beta, mean = rng.normal(size=4), rng.normal(size=4)
    var, bias = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    folded = grids.fold_batch_norm(integers, step, bias, gamma, beta, mean, var, 1e-3)
    x = rng.normal(size=(7, 5))
    expected = gamma * ((x @ (integers * step) + bias) - mean) / np.sqrt(var + 1e-3) + beta
    np.testing.assert_allclose(x @ (folded.integers * folded.scale) + folded.bias, expected,
                               atol=1e-12)
    assert np.all(folded.scale > 0)
    assert folded.negated.tolist() == [False, True, False, False]
    assert np.all(folded.integers == np.round(folded.integers))  # still integers


def test_kernel_integers_rejects_an_off_grid_kernel():
    with pytest.raises(ValueError, match="not on its per-channel grid"):
        grids.kernel_integers(np.array([[0.15, 0.2]]), np.array([0.1, 0.1]))


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (8, True), (4, False)])
def test_fake_quant_native_equals_float_math(bits, signed, requantize, saturate):
    g = grids.activation_grid(bits, signed, 0.13, saturate=saturate)
    x = tf.constant(np.random.default_rng(1).uniform(-40, 40, (2, 50, 100)), tf.float32)
    # unsigned saturating grids: the bottom from a ReLU (for requantize, fused into the
    # identity conv; else the one that computed the input)
    relu = saturate and not signed
    native_in = tf.nn.relu(x) if relu and not requantize else x
    native = FakeQuant.from_grid(g, requantize=requantize, native=True, relu=relu)(native_in)
    math = FakeQuant.from_grid(g, native=False)(x).numpy()
    np.testing.assert_allclose(native.numpy(), math, atol=1e-5)
    q = np.round(native.numpy() / g.scale)
    assert q.min() == g.qmin and q.max() == g.qmax


def _round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_shifted_requantization_moves_no_rounding(seed):
    """Every int8 value n of the source: the shifted identity conv's output
    round(n r + bias r / weight) equals round(n r) + 2^(b-1); its FakeQuant (ReLU fused,
    unsigned grid) gives the signed grid's values plus the shift."""
    rng = np.random.default_rng(seed)
    bits = int(rng.choice([2, 3, 4]))
    source = grids.activation_grid(8, True, float(rng.uniform(0.01, 0.05)))
    target = grids.activation_grid(bits, True, float(rng.uniform(0.1, 0.6)))
    shift = grids.shifted_requantization(source, target)
    assert shift is not None and shift.steps == 2 ** (bits - 1)
    r = source.scale / target.scale
    n = np.arange(source.int8_min, source.int8_max + 1, dtype=np.float64)
    np.testing.assert_array_equal(_round_half_away(n * r + shift.bias * r / shift.weight),
                                  _round_half_away(n * r) + shift.steps)
    stored = shift.grid(target)
    assert (stored.qmin, stored.qmax, stored.int8_max, stored.signed) == (
        0, 2 ** bits - 1, 2 ** bits - 1, False)
    x = tf.constant((n * source.scale).reshape(1, 1, -1, 1), tf.float32)
    native = FakeQuant.from_grid(stored, requantize=True, relu=True,
                                 identity_weight=shift.weight,
                                 identity_bias=shift.bias * source.scale / shift.weight)(x)
    math = FakeQuant.from_grid(target, native=False)(x)
    np.testing.assert_array_equal(np.round(native.numpy() / target.scale),
                                  np.round(math.numpy() / target.scale) + shift.steps)


def test_shifted_requantization_refuses_a_rounding_tie():
    # r = 1/2: every odd n lands on a rounding boundary, which a shift could move
    assert grids.shifted_requantization(grids.activation_grid(8, True, 0.1),
                                        grids.activation_grid(4, True, 0.2)) is None


def test_fake_quant_relu_needs_an_unsigned_grid():
    with pytest.raises(ValueError, match="unsigned grids only"):
        FakeQuant.from_grid(grids.activation_grid(4, True, 0.1), relu=True)


# ---------------------------------------------------------------------------------------------
# Plan and inference graph
# ---------------------------------------------------------------------------------------------


def test_plan_places_each_quantizer_on_the_tensor_that_feeds_it(exported):
    _, _, plan = exported
    kinds = {name: t.kind for name, t in plan.tensors.items()}
    assert kinds["image"] == "grid"  # the model input, read by stem only
    assert kinds["stem_relu"] == "grid"  # read by dw through the zero padding
    assert plan.tensors["stem_relu"].fake_quant == "dw_input_quant"
    # output quantizers in the Keras model: project (read by expand and by the add),
    # head_relu (read by max pool then average pool), logits (the model output)
    assert kinds["project"] == "quantized" and plan.tensors["project"].k == 1
    assert plan.tensors["project"].fake_quant == "project_bn_oq"
    assert kinds["add"] == "grid"  # read by head only
    assert kinds["head_relu"] == "quantized"
    assert kinds["gap"] == "quantized"  # pooling outputs get their own 8-bit quantizer
    assert kinds["logits"] == "quantized"
    assert not plan.calibrated
    assert "stem" not in plan.tensors  # conv + BN + ReLU6 fused: only the ReLU6 output stored
    assert {n: p.bits for n, p in plan.inputs.items()} == {"stem": 8, "logits": 8, **BITS}
    assert {n: p.signed for n, p in plan.inputs.items()} == SIGNED
    assert all(p.exact for p in plan.inputs.values())
    assert plan.inputs["expand"].requantized and not plan.inputs["head"].requantized
    assert plan.weights["project"].batch_norm == "project_bn"
    assert plan.weights["head"].batch_norm is None


def test_plan_without_output_quantizers_calibrates_the_float_tensors():
    model, (train_x, _), _ = _trained(output_bits=None)
    plan = graph.plan(model, calibration_data=train_x)
    kinds = {name: t.kind for name, t in plan.tensors.items()}
    assert kinds["project"] == "shared"  # read by expand (quantized) and add (float)
    assert plan.tensors["project"].k % 2 == 1
    assert kinds["head_relu"] == "calibrated" and kinds["logits"] == "calibrated"
    assert kinds["add"] == "grid" and kinds["gap"] == "grid"
    assert all(p.exact for p in plan.inputs.values())


@pytest.mark.parametrize("weight_storage", graph.WEIGHT_STORAGE)
def test_snap_biases_puts_every_folded_bias_on_its_int32_grid(weight_storage):
    model, _, (test_x, _) = _train_tiny(seed=3, snap=False)
    before = model(test_x).numpy()
    plan = graph.plan(model, int8=False, weight_storage=weight_storage)
    off_grid = _bias_moves(plan)
    assert max(off_grid.values()) > 0.01  # trained biases are off their grids
    info = graph.snap_biases(model, weight_storage=weight_storage)
    assert info["layers"] == len(plan.weights) and not info["skipped"]
    assert 0 < info["max_shift_units"] <= 0.5 + 1e-6
    after_plan = graph.plan(model, int8=False, weight_storage=weight_storage)
    assert _off_grid(model, after_plan) <= 1.0  # on the grid up to float32 rounding
    after = model(test_x).numpy()
    # small shifts; the 8-bit output quantizers (pooling, logits) may absorb them all
    assert np.abs(after - before).max() < 0.5 * np.abs(before).max()
    if weight_storage == "bits":  # the coarser grid holds the finer one: both exact
        spread = graph.plan(model, int8=False, weight_storage="spread")
        assert _off_grid(model, spread) <= 1.0


def _bias_offsets(plan):
    """``(name, weights, |int32-rounded bias - bias|)`` per quantized layer of ``plan``."""
    twin = graph.with_int32_biases(plan)
    for name, w in plan.weights.items():
        yield name, w, np.abs(twin.weights[name].folded.bias - w.folded.bias)


def _bias_moves(plan) -> dict:
    """Per layer, the largest int32 rounding of a bias, in units of its grid."""
    return {name: float((offset / (plan.inputs[name].grid.scale * w.folded.scale)).max())
            for name, w, offset in _bias_offsets(plan)}


def _off_grid(model, plan) -> float:
    """The largest distance of a folded bias from its int32 grid point, in units of the
    float32 rounding the snap cannot avoid (:func:`graph.on_grid_tolerance`): <= 1 is on it."""
    return max(float((offset / graph.on_grid_tolerance(
        keras.ops.convert_to_numpy(graph.bias_target(model, w)), w.folded.bias)).max())
        for _, w, offset in _bias_offsets(plan))


def test_snap_biases_refuses_a_model_without_int8_export():
    model = mm.apply(_tiny_float_model(), mm.QuantConfig(candidate_bits=(4, 8, 16)))
    x, _ = _data(32, 0)
    mm.calibrate(model, x)
    mm.select_bits(model, {"expand": 16})
    mm.enable_weight_quantization(model)
    with pytest.raises(graph.UnsupportedModelError, match="'expand' has a 16-bit input"):
        graph.snap_biases(model)


def test_a_collapsed_step_size_is_refused_in_one_line():
    model = mm.apply(_tiny_float_model(), mm.QuantConfig(candidate_bits=(4, 8)))
    x, _ = _data(32, 0)
    mm.calibrate(model, x)
    mm.select_bits(model, {"expand": 4})
    mm.enable_weight_quantization(model)
    q = next(q for q in mm.activation_quantizers(model) if "expand" in q.name)
    q.step_size.assign(np.full(q.step_size.shape, 1e-8, np.float32))
    with pytest.raises(graph.UnsupportedModelError, match=r"1e-08 floor.*'expand'.*calibrate"):
        graph.plan(model, calibration_data=x)
    graph.plan(model, int8=False)  # the float exports keep the tiny scale


def test_float_inference_graph_computes_the_keras_model():
    model, _, (test_x, _) = _trained()
    plan = graph.plan(model, int8=False)
    inference = graph.build(plan, native=False)
    reference = model(test_x, training=False).numpy()
    np.testing.assert_allclose(inference(test_x).numpy(), reference, atol=1e-4)
    names = {layer.name for layer in inference.layers}
    assert {"dw_input_quant", "expand_input_quant", "head_input_quant"} <= names
    assert not any(n.endswith("_bn") for n in names)  # BatchNorm folded


def test_folded_layers_round_trip_through_keras_files(tmp_path):
    model, _, (test_x, _) = _trained()
    inference = graph.build(graph.plan(model, int8=False), native=False)
    path = str(tmp_path / "inference.keras")
    inference.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(test_x).numpy(), inference(test_x).numpy(), atol=1e-6)
    assert np.array_equal(loaded.get_layer("expand").kernel_integers(),
                          inference.get_layer("expand").kernel_integers())


# ---------------------------------------------------------------------------------------------
# TFLite export, checked with the LiteRT interpreter
# ---------------------------------------------------------------------------------------------


def test_int8_model_is_all_int8_with_4_bit_weights(exported):
    report, out, plan = exported
    summary = tflite.graph_summary(os.path.join(out, "tiny_int8.tflite"))
    assert summary["float_ops"] == []
    # 6 convs and dense-as-conv, the depthwise, and two 1x1 identity depthwise convs that
    # requantize: 'project' for 'expand', the pooled 'gap' (own 8-bit grid) for 'logits'
    assert summary["ops"]["CONV_2D"] == 6 and summary["ops"]["DEPTHWISE_CONV_2D"] == 3
    interp = verify.interpreter(os.path.join(out, "tiny_int8.tflite"), delegates=False)
    interp.allocate_tensors()
    ops = verify._find_weight_ops(interp, plan)
    assert set(ops) == set(plan.inputs)
    for name, op in ops.items():
        weights = interp.get_tensor(op["inputs"][1])
        bits = plan.weights[name].bits
        assert weights.dtype == np.int8
        # stored spread over [-127, 127] ("spread", the default): the b-bit integers times
        # a per-channel multiplier, itself given in the encodings
        multiplier = plan.weights[name].folded.multiplier
        if name == "logits":  # dense: [out, in] in TFLite
            integers = weights.T / multiplier
        else:  # conv [out, h, w, in], depthwise [1, h, w, out]: channel first or last
            channel_axis = 0 if weights.shape[0] == multiplier.size else -1
            shape = [1] * weights.ndim
            shape[channel_axis] = multiplier.size
            integers = weights / multiplier.reshape(shape)
        assert np.array_equal(integers, np.round(integers))
        assert integers.min() >= -(2 ** (bits - 1)) and integers.max() <= 2 ** (bits - 1)


def _clamp_ops(path: str) -> dict:
    ops = tflite.graph_summary(path)["ops"]
    return {op: ops.get(op, 0) for op in ("MINIMUM", "MAXIMUM")}


def test_clamps_cost_no_op_where_saturation_and_relus_do_them(exported, tmp_path):
    """The default export (clamps="saturate") against clamps="ops" (a MINIMUM / MAXIMUM per
    b-bit bound inside the int8 range): the same int8 computation, bit-equal logits, with
    the ops gone where int8 saturation (every b-bit top) or a ReLU (unsigned bottoms, and the
    signed 'expand' input stored shifted into an unsigned grid) does the clamp. The signed
    'head' input (from the add, no requantization to shift in) keeps its MAXIMUM."""
    report, out, plan = exported
    model, (train_x, _), (test_x, _) = _trained()
    old_plan = graph.plan(model, calibration_data=train_x, clamps="ops")
    tflite.export_saved_model(graph.build(old_plan), str(tmp_path / "sm"))
    old = tflite.write_atomic(str(tmp_path / "old.tflite"),
                              tflite.convert(str(tmp_path / "sm"), "int8"))
    new = os.path.join(out, "tiny_int8.tflite")
    # 2-, 3-bit unsigned (dw, project): a MINIMUM each; 4-, 2-bit signed (expand, head): both
    assert _clamp_ops(old) == {"MINIMUM": 4, "MAXIMUM": 2}
    assert plan.inputs["expand"].shift is not None and plan.inputs["head"].shift is None
    assert _clamp_ops(new) == {"MINIMUM": 0, "MAXIMUM": 1}
    assert report["clamps"] == "saturate"
    assert report["runtime"]["ai-edge-litert"] and report["runtime"]["tensorflow"]
    np.testing.assert_array_equal(verify.run_tflite(new, test_x), verify.run_tflite(old, test_x))
    assert all(c.on_grid for c in verify.check_grids(old, old_plan, test_x[:64]))
    old_zero_points = {n: p.grid.zero_point for n, p in old_plan.inputs.items()}
    assert old_zero_points["dw"] == -128 and old_zero_points["expand"] == 0
    # the export report times other files of the network beside its int8 one
    again = run.export_model(model, str(tmp_path / "again"), ["int8"], name="tiny",
                             calibration_data=train_x, eval_images=test_x[:32],
                             tensor_costs=False, latency_rounds=1, latency_runs=2,
                             latency_baselines={"clamp_ops": old}, log=lambda _: None)
    assert again["graphs"]["clamp_ops"]["ops"]["MINIMUM"] == 4
    lat = again["verification"]["latency"]
    assert lat["int8_over_clamp_ops"] == lat["int8"]["median_ms"] / lat["clamp_ops"]["median_ms"]
    assert "int8 / clamp_ops latency" in run.format_report(again)


def test_int8_activations_are_on_their_b_bit_grids(exported):
    report, _, plan = exported
    check = report["verification"]["grid_check"]
    assert check["all_on_grid"]
    by_layer = {c["layer"]: c for c in check["layers"]}
    assert set(by_layer) == set(plan.inputs)
    for name, c in by_layer.items():
        p = plan.inputs[name]
        assert c["bits"] == p.bits and c["signed"] == p.signed
        assert c["int8_scale"] == pytest.approx(p.step, rel=1e-5)
        assert p.grid.qmin <= c["value_min"] <= c["value_max"] <= p.grid.qmax
    assert {c["bits"] for c in by_layer.values()} == {2, 3, 4, 8}
    assert {c["signed"] for c in by_layer.values()} == {True, False}
    # the 2-bit layers use their whole grid
    assert by_layer["dw"]["value_max"] == 3 and by_layer["head"]["value_min"] == -2


def test_int8_model_agrees_with_the_keras_fake_quant_model(exported):
    report, _, _ = exported
    v = report["verification"]
    int8 = v["tflite"]["int8"]
    assert int8["examples"] == 128
    assert int8["top1_agreement"] == 1.0
    # logit tolerance: see the module docstring
    assert int8["max_abs_logit_diff"] <= 0.01 * v["max_abs_reference_logit"]
    assert v["grid_check"]["min_match_keras"] >= 0.999
    assert int8["accuracy"] == v["reference_accuracy"] and v["reference_accuracy"] > 0.9


def test_int8_model_computes_its_keras_twin_exactly(exported):
    """The Keras twin (8-bit grids on the float tensors, int32-rounded biases) and the int8
    model agree on every quantized layer's input integers, not just on the logits."""
    report, _, _ = exported
    v = report["verification"]
    twin = v["tflite"]["int8"]["vs_int8_keras_twin"]
    assert twin["top1_agreement"] == 1.0
    assert v["grid_check"]["min_match_int8_twin"] >= 0.999
    first = v["grid_check"]["layers"][0]
    assert first["layer"] == "stem" and first["match_keras"] == 1.0
    assert v["int8_tensor_costs"] == []  # output quantizers: no tensor is float in Keras


def test_float_models_reproduce_the_keras_model(exported):
    report, _, _ = exported
    v = report["verification"]
    assert v["tflite"]["float32"]["top1_agreement"] == 1.0
    assert v["tflite"]["float32"]["max_abs_logit_diff"] < 1e-4
    assert v["tflite"]["float16"]["top1_agreement"] == 1.0
    assert v["keras_graphs"]["float"]["max_abs_logit_diff"] < 1e-4
    for fmt in ("float16", "float32"):
        summary = tflite.graph_summary(report["files"][fmt]["path"])
        assert "FLOOR" in summary["ops"]  # the fake quants, in float math


def test_exported_models_run_in_ai_edge_litert(exported):
    from ai_edge_litert.interpreter import Interpreter

    report, _, _ = exported
    _, _, (test_x, _) = _trained()
    for fmt in ("int8", "float16", "float32"):
        interp = Interpreter(model_path=report["files"][fmt]["path"])
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], test_x[:1])
        interp.invoke()
        assert interp.get_tensor(interp.get_output_details()[0]["index"]).shape == (1, 4)
    assert isinstance(verify.interpreter(report["files"]["int8"]["path"]), Interpreter)


def test_report_files_and_latency(exported):
    report, out, _ = exported
    on_disk = _json(os.path.join(out, run.REPORT_NAME))
    assert on_disk["formats"] == ["int8", "float16", "float32"]
    for key in ("int8", "float16", "float32", "encodings", "keras", "saved_model"):
        assert os.path.exists(report["files"][key]["path"]) and report["files"][key]["bytes"] > 0
    assert report["files"]["int8"]["bytes"] < report["files"]["float32"]["bytes"]
    lat = report["verification"]["latency"]
    assert lat["int8"]["median_ms"] > 0 and lat["float32_over_int8"] > 0
    loaded = keras.saving.load_model(report["files"]["keras"]["path"])
    assert "expand_input_quant" in {layer.name for layer in loaded.layers}
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or ".tmp." in f]
    text = run.format_report(report)
    assert "int8" in text and "top-1" in text
    assert f"ai-edge-litert {report['runtime']['ai-edge-litert']}" in text


def test_encodings_sidecar(exported):
    report, _, plan = exported
    content = _json(report["files"]["encodings"]["path"])
    assert content["version"] == encodings.ENCODINGS_VERSION
    assert content["gbops"] == 0.001 and content["searcher"] == "hand"
    acts = content["activation_encodings"]
    assert {n: a["bitwidth"] for n, a in acts.items()} == {"stem": 8, "logits": 8, **BITS}
    dw, expand = acts["dw"], acts["expand"]
    assert (dw["signed"], dw["offset"], dw["qmin"], dw["qmax"]) == (False, 0, 0, 3)
    assert (expand["signed"], expand["offset"], expand["qmax"]) == (True, -8, 7)
    assert dw["scale"] == pytest.approx(plan.inputs["dw"].step)
    assert dw["int8_zero_point"] == 124  # saturating: 3 is the int8 top
    # shifted into the unsigned 4-bit grid [0, 15] (zero point 112): q + 8
    assert expand["int8_zero_point"] == 112 and expand["int8_shift_steps"] == 8
    assert expand["requantized"] and expand["exact_in_int8"]
    params = content["param_encodings"]
    assert params["expand"]["bitwidth"] == 4 and params["stem"]["bitwidth"] == 8
    assert len(params["expand"]["scale"]) == 16 and params["expand"]["offset"] == -8
    assert params["expand"]["batch_norm_folded"] == "expand_bn"
    assert params["dw"]["layer_type"] == "QuantDepthwiseConv2D"
    assert set(content["int8_only_encodings"]) == {"project", "project2", "head_relu", "gap",
                                                   "logits"}
    assert content["avg_activation_bits"] == pytest.approx(np.mean(list(
        content["activation_bits"].values())))


@pytest.mark.parametrize("io_type", ["uint8", "int8"])
def test_integer_io_models_predict_what_the_float_io_model_predicts(exported, io_type):
    report, out, plan = exported
    key = f"int8_{io_type}io"
    with open(f"{out}/tiny_{key}.tflite", "rb") as f:
        data = f.read()
    spec = integer_io.io_spec(data)
    first = plan.inputs["stem"]  # the model input feeds the stem: its 8-bit signed grid
    shift = 128 if io_type == "uint8" else 0
    assert spec["input"]["dtype"] == spec["output"]["dtype"] == io_type
    assert spec["input"]["scale"] == pytest.approx(first.step, rel=1e-6)
    assert spec["input"]["zero_point"] == first.grid.zero_point + shift
    # no float left: the app quantizes (uint8 I/O keeps two QUANTIZE ops, uint8 <-> int8)
    assert "float32" not in tflite.graph_summary(data)["tensor_dtypes"]
    # the same integers flow through: bit-equal logits (quantize() rounds as QUANTIZE does)
    vs = report["verification"]["tflite"][key]["vs_float_io_int8"]
    assert vs["top1_agreement"] == 1.0 and vs["max_abs_logit_diff"] == 0.0
    meta = integer_io.read_metadata(data)
    assert meta["labels"] == LABELS and meta["input"] == spec["input"]
    assert meta["normalisation"].startswith("x = image")
    assert _json(report["files"]["io_spec"]["path"])[key] == meta
    with open(report["files"]["labels"]["path"]) as f:
        assert f.read().splitlines() == LABELS



def test_deploy_guide_python_snippet(exported):
    """docs/deploy.md's Python snippet, on the tiny model's uint8-I/O file: the class it
    returns for camera pixels is the float-I/O int8 model's for the same pixels."""
    report, out, _ = exported
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "deploy.md")) as f:
        guide = f.read()
    snippet = guide.split("```python\n")[1].split("```")[0]
    assert "export/mobilenet_v2" in snippet
    scope = {}
    exec(compile(snippet.replace("export/mobilenet_v2", f"{out}/tiny"), "deploy.md", "exec"),
         scope)
    images, _ = _data(16, 7)
    pixels = np.round((images + 1.0) * 127.5).astype(np.uint8)  # the tiny model's "camera"
    expected = verify.run_tflite(f"{out}/tiny_int8.tflite",
                                 pixels.astype(np.float32) / 127.5 - 1.0).argmax(-1)
    assert [scope["classify"](p) for p in pixels] == [LABELS[i] for i in expected]


# The field list of AIMET's quantization encoding specification, version 0.6.1
# (github.com/quic/aimet, Docs/api_docs/quantization_encoding_specification.rst, section 4.1)
AIMET_0_6_1_ENCODING = {"bitwidth": int, "dtype": str, "is_symmetric": str, "max": float,
                        "min": float, "offset": int, "scale": float}
AIMET_0_6_1_QUANTIZER_ARGS = {"activation_bitwidth": int, "dtype": str, "is_symmetric": str,
                              "param_bitwidth": int, "per_channel_quantization": str,
                              "quant_scheme": str}


def test_aimet_encodings_follow_the_published_field_list(exported):
    report, out, plan = exported
    content = _json(report["files"]["aimet_encodings"]["path"])
    assert set(content) == {"version", "activation_encodings", "param_encodings",
                            "quantizer_args"}
    assert content["version"] == "0.6.1"
    args = content["quantizer_args"]
    assert {k: type(v) for k, v in args.items()} == AIMET_0_6_1_QUANTIZER_ARGS
    assert args["is_symmetric"] in ("True", "False")
    interp = verify.interpreter(f"{out}/tiny_int8.tflite", delegates=False)
    names = {t["name"] for t in interp.get_tensor_details()}
    for section in ("activation_encodings", "param_encodings"):
        assert content[section]
        for name, entries in content[section].items():
            assert name in names  # keyed by the .tflite's tensor names
            assert isinstance(entries, list) and entries
            for e in entries:
                assert {k: type(v) for k, v in e.items()} == AIMET_0_6_1_ENCODING, name
                assert e["dtype"] == "int" and e["is_symmetric"] in ("True", "False")
                assert 4 <= e["bitwidth"] <= 32 and e["scale"] > 0
                assert e["min"] == pytest.approx(e["offset"] * e["scale"])
                assert e["max"] == pytest.approx(e["min"] + e["scale"] * (2 ** e["bitwidth"] - 1))
    # the searched grids, on the tensors the int8 model runs them on
    ops = verify._find_weight_ops((interp.allocate_tensors(), interp)[1], plan)
    details = {t["index"]: t for t in interp.get_tensor_details()}
    for layer, p in plan.inputs.items():
        (act,) = content["activation_encodings"][details[ops[layer]["inputs"][0]]["name"]]
        assert act["scale"] == pytest.approx(p.step)
        assert act["bitwidth"] == max(p.bits, 4)
        # signed grids stored shifted into the unsigned one (grids.Shift) have offset 0
        signed = p.signed and p.shift is None
        assert act["offset"] == (-(2 ** (act["bitwidth"] - 1)) if signed else 0)
        kernel = content["param_encodings"][details[ops[layer]["inputs"][1]]["name"]]
        w = plan.weights[layer]
        assert len(kernel) == w.folded.scale.size
        assert {e["bitwidth"] for e in kernel} <= {w.bits, 8}
        if kernel[0]["bitwidth"] == w.bits:
            np.testing.assert_allclose([e["scale"] for e in kernel], w.folded.grid_scale,
                                       rtol=1e-6)
    assert aimet.VERSION == "0.6.1"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _run_dir(tmp_path, model=None, bits=True, final=True) -> str:
    model_dir = tmp_path / "tiny-run"
    model_dir.mkdir()
    config_lib.save(config_lib.ExperimentConfig(model_dir=str(model_dir)),
                    str(model_dir / "config.yaml"))
    if model is None:
        model = _trained()[0]
    if bits:
        (model_dir / "bits.json").write_text(json.dumps(
            {"searcher": "hand", "bits": mm.get_bits(model), "gbops": 0.001}))
    if final:
        model.save(str(model_dir / "final.keras"))
    return str(model_dir)


def test_run_without_bits_json_names_the_fix(tmp_path):
    model_dir = _run_dir(tmp_path, bits=False, final=False)
    with pytest.raises(run.RunError, match=r"no bits.json.*--phase"):
        run.load_run(model_dir)


def test_run_without_final_checkpoint_names_the_fix(tmp_path):
    model_dir = _run_dir(tmp_path, final=False)
    with pytest.raises(run.RunError, match=r"no final.keras.*--phase=finetune"):
        run.load_run(model_dir)


def test_run_loads_and_checks_bits(tmp_path):
    model_dir = _run_dir(tmp_path)
    loaded = run.load_run(model_dir)
    assert mm.get_bits(loaded.model) == mm.get_bits(_trained()[0])
    with open(os.path.join(model_dir, "bits.json"), "w") as f:
        json.dump({"bits": {"expand": 8}}, f)
    with pytest.raises(run.RunError, match="disagree"):
        run.load_run(model_dir)


def test_latest_run_and_missing_run_root(tmp_path):
    with pytest.raises(run.RunError, match="No training runs"):
        run.latest_run(str(tmp_path / "nothing"))
    for i, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}\n")
        os.utime(tmp_path / name / "config.yaml", (1000 + i, 1000 + i))
    assert run.latest_run(str(tmp_path)) == str(tmp_path / "b")


def test_int8_export_of_a_16_bit_activation_is_refused(tmp_path):
    keras.utils.set_random_seed(0)
    model = mm.apply(_tiny_float_model(), mm.QuantConfig(candidate_bits=(4, 8, 16)))
    x, _ = _data(32, 0)
    mm.calibrate(model, x)
    mm.select_bits(model, {"expand": 16})
    mm.enable_weight_quantization(model)
    with pytest.raises(graph.UnsupportedModelError,
                       match=r"'expand' has a 16-bit activation.*float16 / float32"):
        run.export_model(model, str(tmp_path), ["int8"], calibration_data=x, log=lambda _: None)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tflite")]
    # the float exports take it
    report = run.export_model(model, str(tmp_path), ["float32"], eval_images=x,
                              latency_rounds=1, latency_runs=1, log=lambda _: None)
    assert report["verification"]["tflite"]["float32"]["top1_agreement"] == 1.0


def test_unsupported_layer_is_named():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.Permute((2, 1, 3), name="swap")(x)  # (LayerNormalization is a float island now)
    x = L.Flatten()(x)
    model = mm.apply(keras.Model(inp, L.Dense(2, name="fc")(x)))
    mm.select_bits(model)
    mm.enable_weight_quantization(model)
    with pytest.raises(graph.UnsupportedModelError, match=r"'swap' \(Permute\)"):
        graph.plan(model, int8=False)


def test_float_weighted_layer_is_refused():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="kept_float")(inp)
    x = L.Flatten()(x)
    model = mm.apply(keras.Model(inp, L.Dense(2, name="fc")(x)),
                     mm.QuantConfig(exclude=("kept_float",)))
    mm.select_bits(model)
    mm.enable_weight_quantization(model)
    with pytest.raises(graph.UnsupportedModelError, match=r"'kept_float'.*quant.exclude"):
        graph.plan(model, int8=False)


def test_weight_quantization_off_is_refused():
    model = mm.apply(_tiny_float_model())
    mm.select_bits(model)
    with pytest.raises(graph.UnsupportedModelError, match="weight quantizer is off"):
        graph.plan(model, int8=False)


def test_formats_are_checked():
    assert run.parse_formats("float32,int8") == ("int8", "float32")
    with pytest.raises(ValueError, match="formats"):
        run.parse_formats("int4")
    with pytest.raises(ValueError, match="`clamps` must be one of"):
        graph.plan(None, clamps="minmax")


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = str(tmp_path / "model.tflite")

    def fail(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("converter died")

    with pytest.raises(RuntimeError, match="converter died"):
        tflite.write_atomic(target, fail)
    assert os.listdir(tmp_path) == []
    tflite.write_atomic(target, b"whole")
    with open(target, "rb") as f:
        assert f.read() == b"whole"
    assert os.listdir(tmp_path) == ["model.tflite"]


def test_failed_conversion_writes_no_tflite(tmp_path, monkeypatch):
    model, (train_x, _), _ = _trained()

    def broken(saved_model_dir, fmt, **kwargs):
        raise tflite.ConversionError(f"broken converter. Received: fmt={fmt!r}")

    monkeypatch.setattr(tflite, "convert", broken)
    with pytest.raises(tflite.ConversionError):
        run.export_model(model, str(tmp_path), ["int8"], calibration_data=train_x,
                         log=lambda _: None)
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith(".tflite") or ".tmp" in n]


# ---------------------------------------------------------------------------------------------
# A full run (slow: needs `python train.py --model=mobilenet_v2 --phase=all` first)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_of_the_trained_mobilenet_v2_run(tmp_path):
    """After ``python train.py --model=mobilenet_v2 --phase=all`` (output quantizers and
    snapped biases), the int8 model agrees with final.keras itself on >= 99.5% of the 500
    embedded eval images, and keeps every quantized input on its grid."""
    model_dir = os.environ.get("METAMIX_RUN_DIR",
                               os.path.join("runs", "mobilenet_v2-mnist_embedded"))
    if not os.path.exists(os.path.join(model_dir, "final.keras")):
        pytest.skip(f"no trained run at {model_dir}")
    report = run.export_run(model_dir, output_dir=str(tmp_path), latency_rounds=2,
                            tensor_costs=False, log=lambda _: None)
    v = report["verification"]
    assert v["examples"] == 500
    assert v["tflite"]["int8"]["top1_agreement"] >= 0.995
    assert v["tflite"]["int8"]["vs_int8_keras_twin"]["top1_agreement"] >= 0.995
    assert v["grid_check"]["all_on_grid"]
    assert v["tflite"]["float32"]["top1_agreement"] >= 0.995
    assert tflite.graph_summary(report["files"]["int8"]["path"])["float_ops"] == []
    assert v["latency"]["float32_over_int8"] > 1.0
