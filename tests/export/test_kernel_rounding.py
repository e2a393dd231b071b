"""``metamix_tf.export.kernel_rounding``: which tensors get the int8 conv kernels' rounding,
and that with it every integer the Keras model and the int8 model both round is equal."""

from __future__ import annotations

import keras
import numpy as np

import metamix_tf as mm
from metamix_tf.export import divergence, families, graph, kernel_rounding, kernels
from metamix_tf.quant import wrap

L = keras.layers


def _model() -> keras.Model:
    """conv + BN + ReLU (fused); a wide 3x3 conv (1,152 products per output: float32
    accumulation noise puts some values across rounding boundaries) + BN; a depthwise
    conv + BN + ReLU6 read by one conv (its grid); a residual add + ReLU (written by the
    int8 ADD, not a conv); a pooling and a dense head."""
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(128, 3, padding="same", use_bias=False, name="stem")(inp)))
    x = L.ReLU(name="wide_relu")(L.BatchNormalization(name="wide_bn")(
        L.Conv2D(32, 3, padding="same", use_bias=False, name="wide")(x)))
    y = L.ReLU(6.0, name="dw_relu")(L.BatchNormalization(name="dw_bn")(
        L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization(name="project_bn")(
        L.Conv2D(32, 1, use_bias=False, name="project")(y))
    x = L.ReLU(name="out_relu")(L.Add(name="add")([x, y]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x))


def _prepared(images):
    """Wrapped, calibrated, every activation at 8 bits (the widest grids, where float32
    noise moves the most values), 4-bit weights, biases snapped; and its export plan."""
    keras.utils.set_random_seed(0)
    model = _model()
    families.set_batch_norm_statistics(model, images)
    wrapped = mm.apply(model)
    mm.calibrate(wrapped, images)
    mm.select_bits(wrapped, {q.name: 8 for q in mm.quant_layers(wrapped)
                             if q.input_quantizer.searchable})
    mm.enable_weight_quantization(wrapped)
    graph.snap_biases(wrapped)
    return wrapped, graph.plan(wrapped, images)


def test_every_conv_mean_and_add_written_tensor_gets_the_kernel_rounding():
    images = np.random.default_rng(0).uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    wrapped, export_plan = _prepared(images)
    rounded = kernel_rounding.set_kernel_rounding(wrapped, export_plan)
    (image,) = [n.name for n in export_plan.nodes if n.kind == "input"]
    assert set(rounded) == {image, "stem_relu", "wide_relu", "dw_relu", "project", "out_relu",
                            "pool", "logits"}
    assert wrapped.get_layer("stem").input_quantizer.kernel_rounding["reciprocal"] == (
        np.float32(1) / np.float32(export_plan.tensors[image].grid.scale))
    by_tensor = {t.name: q for t, _, q in kernel_rounding.rounding_quantizers(wrapped,
                                                                               export_plan)}
    assert by_tensor["out_relu"].kernel_rounding is None  # written by the int8 ADD: its
    add = wrapped.get_layer("add").kernel_rounding  # QuantAdd adds as the kernel does
    grids = [export_plan.tensors[n].grid.scale for n in ("wide_relu", "project", "out_relu")]
    params = kernels.add_params(*grids)
    assert add["multipliers"] == [params.multiplier_a, params.multiplier_b]
    assert add["shift"] == params.shift
    pool = by_tensor["pool"].kernel_rounding  # int8 MEAN: its zero point before rounding
    assert pool["offset"] == export_plan.tensors["pool"].grid.zero_point == -128
    assert pool["step"] == np.float32(by_tensor["pool"].selected_step)
    assert by_tensor["stem_relu"].kernel_rounding["offset"] == 0
    assert by_tensor["dw_relu"] is wrapped.get_layer("project").input_quantizer
    kernel_rounding.clear_kernel_rounding(wrapped)
    assert all(q.kernel_rounding is None for q in wrap.activation_quantizers(wrapped))
    assert wrapped.get_layer("add").kernel_rounding is None


def test_with_the_kernel_rounding_every_stored_integer_equals_the_int8_models():
    """Conv outputs are rounded from the recovered accumulator as the kernels do, and the
    ADD's inputs are then the int8 model's integers."""
    rng = np.random.default_rng(1)
    calibration, images = (rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
                           for n in (32, 64))
    wrapped, _ = _prepared(calibration)
    rows = divergence.model_divergence(wrapped, calibration, images)
    assert {r["tensor"] for r in rows} >= {"stem_relu", "dw_relu", "project", "out_relu"}
    assert divergence.first_divergence(rows) is None


def test_a_concatenation_rounds_each_members_channels_with_that_members_arithmetic():
    """Two conv branches and a residual sum concatenated (the convs and the ADD write onto
    the concatenation's grid): its output quantizer gets the convs' per-channel arithmetic
    and a pass-through for the sum's channels; every stored integer equals the int8
    model's."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(name="stem_relu")(L.Conv2D(64, 3, padding="same", name="stem")(inp))
    a = L.ReLU(name="a_relu")(L.Conv2D(16, 3, padding="same", name="a")(x))
    b = L.Conv2D(8, 1, name="b")(x)
    c = L.Add(name="sum")([L.Conv2D(4, 1, name="c1")(x), L.Conv2D(4, 1, name="c2")(x)])
    y = L.Concatenate(name="cat")([a, b, c])
    model = keras.Model(inp, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(y)))
    rng = np.random.default_rng(2)
    calibration, images = (rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32) for n in (32, 64))
    wrapped, _ = families.quantize_at_random(model, calibration)
    export_plan = graph.plan(wrapped, calibration)
    rounded = kernel_rounding.set_kernel_rounding(wrapped, export_plan)
    assert {"cat", "sum"} <= set(rounded)
    assert [export_plan.tensors[n].kind for n in ("a_relu", "b", "sum")] == ["member"] * 3
    cat = wrapped.get_layer("cat_oq").kernel_rounding
    assert len(cat["unit"]) == 28 and cat["scale"][24:] == [1.0] * 4
    rows = divergence.model_divergence(wrapped, calibration, images)
    assert divergence.first_divergence(rows) is None


def test_builtin_convs_get_the_fixed_point_rounding():
    """Layers packed as INT4 run on the builtin kernels: their tensors get those kernels'
    fixed-point parameters, every other tensor the XNNPACK arithmetic as before."""
    images = np.random.default_rng(0).uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    wrapped, export_plan = _prepared(images)
    plain = kernel_rounding.set_kernel_rounding(wrapped, export_plan)
    assert kernel_rounding.set_kernel_rounding(wrapped, export_plan, {"wide", "dw"}) == plain
    by_tensor = {t.name: q for t, _, q in kernel_rounding.rounding_quantizers(wrapped,
                                                                               export_plan)}
    weights = export_plan.weights["wide"]
    s_in = export_plan.inputs["wide"].stored_grid.scale
    multipliers, shifts = kernels.builtin_conv_params(
        s_in, weights.folded.scale, export_plan.tensors["wide_relu"].grid.scale)
    fixed = by_tensor["wide_relu"].kernel_rounding
    assert fixed["multiplier"] == multipliers.tolist() and fixed["shift"] == shifts.tolist()
    assert "multiplier" in by_tensor["dw_relu"].kernel_rounding
    assert "scale" in by_tensor["stem_relu"].kernel_rounding
    assert "scale" in by_tensor["project"].kernel_rounding
