"""The int8 export beyond the model zoo: the graph rules of ``metamix_tf.quant.graph_rules`` on a
small network that holds every rule (fast), and the keras.applications CNN families
(slow; the recipe is ``metamix_tf.export.families``).

Each case: ``apply()``, calibration, random bits from {2, 3, 4, 8}, 4-bit weights, biases
snapped onto the int32 grid, int8 export, checked with the LiteRT interpreter: top-1
agreement with the Keras model, every quantized input on its b-bit grid, no weighted layer
left float, no float op in the int8 model other than input preprocessing.

Agreement of the families (measured with ``benchmarks/export_families.py``, 64 inputs,
TF 2.21, ai-edge-litert): the Keras model and the int8 model round the same tensors on the
same grids, and with the export's kernel rounding (``metamix_tf.export.kernel_rounding``)
the Keras model computes the int8 kernels' integers for the tensors convs, poolings and adds
write; where a value the Keras model computes in float32 lies within ~1e-6 of a rounding
boundary in a tensor it does not cover, a one-step difference travels on through a deep
network with random weights and 2-bit layers. Families measured below 99.5% are marked xfail
with their number (see docs/results/export_families_kernel_rounding.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import ROOT

import metamix_tf as mm
from metamix_tf.export import divergence, families, graph, pool_steps, run
from metamix_tf.quant import canonical, graph_rules, wrap

L = keras.layers


def _rules_model() -> keras.Model:
    """Rescaling; conv + BN + ReLU; separable conv; squeeze-and-excitation with MobileNetV3's
    hard-sigmoid ops; pre-activation BN; concatenation; 'valid' and 'same' average pooling;
    a conv with a sigmoid inside; max pooling, global pooling, dense."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    s = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    s = L.BatchNormalization(name="sep_bn")(s)
    s = L.Activation("relu", name="sep_relu")(s)
    # squeeze-and-excitation, hard sigmoid as keras.ops calls (as MobileNetV3 builds it)
    e = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(s)
    e = L.Conv2D(4, 1, activation="relu", name="se_reduce")(e)
    e = L.Conv2D(8, 1, name="se_expand")(e)
    e = L.ReLU(6.0, name="se_relu6")(e + 3.0) * (1.0 / 6.0)
    s = L.Multiply(name="se_mul")([s, e])
    c = L.Concatenate(name="concat")([x, s])
    c = L.BatchNormalization(name="pre_bn")(c)  # pre-activation: does not fold
    c = L.Activation("relu", name="pre_relu")(c)
    a = L.AveragePooling2D(2, name="pool_valid")(c)
    b = L.AveragePooling2D(3, strides=1, padding="same", name="pool_same")(a)
    y = L.Conv2D(8, 1, activation="sigmoid", name="gate")(b)
    y = L.MaxPooling2D(2, name="max")(y)
    y = L.GlobalAveragePooling2D(name="gap")(y)
    out = L.Dense(10, name="logits")(y)
    return keras.Model(inp, out, name="rules")


def _bn_statistics(model, images):
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.momentum = 0.0
    model(images, training=True)


def test_canonicalize_splits_separable_and_activations_and_keeps_the_function():
    keras.utils.set_random_seed(0)
    model = _rules_model()
    new = canonical.canonicalize(model)
    names = {layer.name for layer in new.layers}
    assert {"sep_depthwise", "sep", "gate_activation"} <= names
    assert not any(isinstance(layer, L.SeparableConv2D) for layer in new.layers)
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    # the same function, up to the sigmoid rounded onto TFLite's 1/256 grid
    assert {"gate_activation_grid"} <= names
    np.testing.assert_allclose(new(x), model(x), rtol=0, atol=0.05)
    assert canonical.canonicalize(new) is new  # nothing left to rewrite


def test_apply_puts_output_quantizers_where_the_int8_model_stores():
    keras.utils.set_random_seed(0)
    wrapped = mm.apply(_rules_model(), mm.QuantConfig())
    oq = {q.name for q in mm.output_quantizers(wrapped)}
    # concatenation and pooling outputs, the pre-activation BN's input, hard-sigmoid ops
    assert {"concat_oq", "se_pool_oq", "pool_valid_oq", "gap_oq", "stem_relu_oq"} <= oq
    assert "sep_relu_oq" in oq  # read by the pool, the multiply
    assert "pool_same_oq" in oq  # exported as mean convs onto its own grid
    assert wrap.unsupported_layers(wrapped) == []
    assert graph_rules.stores(L.Conv2D(1, 1), L.ReLU(), 1) is False


def test_int8_export_of_every_rule_agrees_with_keras(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (96, 16, 16, 3)).astype(np.float32)
    model = _rules_model()
    _bn_statistics(model, images[:32])
    wrapped = mm.apply(model, mm.QuantConfig())
    mm.calibrate(wrapped, images[:32])
    bits = {layer.name: int(rng.choice(layer.input_quantizer.candidate_bits))
            for layer in mm.quant_layers(wrapped) if layer.input_quantizer.searchable}
    mm.select_bits(wrapped, bits)
    mm.enable_weight_quantization(wrapped)
    graph.snap_biases(wrapped)
    report = run.export_model(wrapped, str(tmp_path), ("int8",), name="rules",
                              calibration_data=images[:32], eval_images=images[32:],
                              tensor_costs=False, latency_rounds=1, latency_runs=2,
                              log=lambda _: None)
    v = report["verification"]
    assert v["tflite"]["int8"]["top1_agreement"] >= 0.995
    # the Keras model in float64 as a second reference (the sigmoid runs as int8 LOGISTIC,
    # a lookup table, so neither reference is integer-exact here)
    assert v["float64_reference"]["int8_vs_float64"]["top1_agreement"] >= 0.995
    assert v["grid_check"]["all_on_grid"]
    assert report["graphs"]["int8"]["float_ops"] == []
    assert report["graphs"]["int8"]["float_prefix_ops"]  # the Rescaling, before the input
    assert "rules_int8.tflite" in report["files"]["int8"]["path"]


def _one_pixel_se_model() -> keras.Model:
    """MobileNetV3's squeeze-and-excitation where the map is 1x1 (its last stages at 32x32)."""
    inp = keras.Input((4, 4, 3), name="image")
    x = L.Conv2D(16, 4, use_bias=False, name="stem")(inp)  # 1x1
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    e = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    e = L.Conv2D(8, 1, activation="relu", name="se_reduce")(e)
    e = L.Conv2D(16, 1, name="se_expand")(e)
    e = L.ReLU(6.0, name="se_relu6")(e + 3.0) * (1.0 / 6.0)
    x = L.Multiply(name="se_mul")([x, e])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="one_pixel_se")


@pytest.mark.parametrize("fixed", [True, False])
def test_a_pooling_over_one_pixel_keeps_its_rescaling(tmp_path, monkeypatch, fixed):
    """The converter drops a mean over a 1x1 map with the rescaling onto its output
    quantizer's grid (the reader's bias keeps that scale, its input gets the other): the
    export rescales before the mean. Without that, the SE conv's inputs differ."""
    if not fixed:
        monkeypatch.setattr(graph, "_pools_one_element", lambda layer: False)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (96, 4, 4, 3)).astype(np.float32)
    model = _one_pixel_se_model()
    _bn_statistics(model, images[:32])
    wrapped = mm.apply(model, mm.QuantConfig(candidate_bits=(4, 8)))
    mm.calibrate(wrapped, images[:32])
    mm.select_bits(wrapped, {layer.name: 4 for layer in mm.quant_layers(wrapped)
                             if layer.input_quantizer.searchable})
    pool = next(q for q in mm.output_quantizers(wrapped) if q.name == "se_pool_oq")
    pool.step_size.assign(pool.step_size * 1.3)  # a grid of its own, as training leaves it
    mm.enable_weight_quantization(wrapped)
    graph.snap_biases(wrapped)
    report = families.export_quantized(wrapped, "se", images[:32], images[32:], str(tmp_path),
                                       latency_runs=2)
    match = report["verification"]["grid_check"]["min_match_keras"]
    assert (match == 1.0) is fixed


def test_a_layer_without_rule_is_named_not_an_attribute_error():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.UpSampling2D(name="up")(x)
    out = L.Dense(2, name="logits")(L.Flatten()(x))
    wrapped = mm.apply(keras.Model(inp, out), mm.QuantConfig())
    mm.calibrate(wrapped, np.zeros((2, 8, 8, 3), np.float32))
    mm.select_bits(wrapped)
    mm.enable_weight_quantization(wrapped)
    with pytest.raises(graph.UnsupportedModelError, match=r"'up' \(UpSampling2D\).*Received"):
        graph.plan(wrapped, int8=False)


def _tiny_backbone() -> keras.Model:
    """A functional backbone: conv + BN + ReLU6, max pooling, an inverted residual block
    whose sum goes through a ReLU (non-negative: the pooled step calibrates to its own)."""
    inp = keras.Input((16, 16, 3), name="backbone_in")
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="b_stem")(inp)
    x = L.BatchNormalization(name="b_stem_bn")(x)
    x = L.ReLU(6.0, name="b_stem_relu")(x)
    x = L.MaxPooling2D(2, name="b_pool")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="b_dw")(x)
    y = L.BatchNormalization(name="b_dw_bn")(y)
    y = L.ReLU(6.0, name="b_dw_relu")(y)
    y = L.Conv2D(8, 1, use_bias=False, name="b_project")(y)
    y = L.BatchNormalization(name="b_project_bn")(y)
    x = L.Add(name="b_add")([x, y])
    x = L.ReLU(name="b_out_relu")(x)
    return keras.Model(inp, x, name="backbone")


def _with_head(backbone: keras.Model, shape: tuple) -> keras.Model:
    """``backbone`` called as one layer inside a functional model with a classifier head."""
    inp = keras.Input(shape, name="image")
    x = backbone(inp)
    x = L.GlobalAveragePooling2D(name="head_pool")(x)
    x = L.Dropout(0.2, name="head_dropout")(x)
    return keras.Model(inp, L.Dense(10, name="head_logits")(x), name="nested")


def _export_nested(model: keras.Model, images: np.ndarray, tmp_path,
                   backbone_layers=("b_stem", "b_dw", "b_project")) -> dict:
    wrapped, _ = families.quantize_at_random(model, images[:32])
    assert {*backbone_layers, "head_logits"} <= {
        layer.name for layer in mm.quant_layers(wrapped)}
    return families.export_quantized(wrapped, "nested", images[:32], images[32:],
                                     str(tmp_path))


def _assert_exact(report: dict) -> None:
    v = report["verification"]
    assert report["float_layers"] == []
    assert report["graphs"]["int8"]["float_ops"] == []
    assert v["grid_check"]["all_on_grid"]
    assert v["tflite"]["int8"]["top1_agreement"] >= 0.995


@pytest.mark.slow  # ~100 s under load; the divergence test below covers the nested path fast
def test_nested_backbone_exports_to_int8(tmp_path):
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(-1, 1, (96, 16, 16, 3)).astype(np.float32)
    _assert_exact(_export_nested(_with_head(_tiny_backbone(), (16, 16, 3)), images, tmp_path))


def test_divergence_finds_only_rounding_boundary_flips():
    """Every tensor both models round on the same grid holds the same integers, or the first
    one that differs does so at a rare value the Keras model computed within float32 noise
    of a rounding boundary (not at systematic exact ties, not off by a real error)."""
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(1).uniform(-1, 1, (40, 16, 16, 3)).astype(np.float32)
    wrapped, _ = families.quantize_at_random(_with_head(_tiny_backbone(), (16, 16, 3)),
                                             images[:32])
    rows = divergence.model_divergence(wrapped, images[:32], images[32:])
    assert {r["kind"] for r in rows} == {"grid", "quantized"}
    assert sum(r["elements"] for r in rows) > 10_000
    first = divergence.first_divergence(rows)
    # float32 noise puts about 1 value in 1e5 within 1e-4 of a boundary; many there means
    # exact ties (without the pooled-step snap: 3 of head_pool's 64 integers at 7.4999986)
    assert first is None or (first["max_tie_distance"] < 1e-4 and first["mismatches"] <= max(
        1, 1e-3 * first["elements"])), first


def test_relu_of_a_stored_tensor_rounds_as_keras():
    """NASNet's reduction cell: an add read by a pooling and by a ReLU whose reader is a
    3-bit depthwise conv. LiteRT's RELU op that rescales rounds ``(q + 1/2) s_in / s_out``
    (here 1 -> 1 for an exact 0.47, 3 -> 2 for 1.41); the export runs such a ReLU as a
    requantizing identity conv, and every integer equals the Keras model's."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((2, 2, 8))
    x = L.Add(name="add")([L.Conv2D(16, 1, name="a")(inp), L.Conv2D(16, 1, name="b")(inp)])
    d = L.DepthwiseConv2D(3, padding="same", name="dw")(L.Activation("relu", name="act")(x))
    p = L.AveragePooling2D(3, strides=1, padding="same", name="pool")(x)
    y = L.GlobalAveragePooling2D(name="gap")(L.Concatenate(name="cat")([d, p]))
    model = keras.Model(inp, L.Dense(10, name="fc")(y))
    images = np.random.default_rng(0).normal(size=(96, 2, 2, 8)).astype(np.float32)
    wrapped = mm.apply(model)
    mm.calibrate(wrapped, images[32:])
    mm.select_bits(wrapped, {q.name: 3 if q.name == "dw" else 8
                             for q in mm.quant_layers(wrapped) if q.input_quantizer.searchable})
    mm.enable_weight_quantization(wrapped)
    pool_steps.snap_pooled_steps(wrapped)
    graph.snap_biases(wrapped)
    rows = {r["tensor"]: r for r in divergence.model_divergence(wrapped, images[32:],
                                                                 images[:32])}
    assert rows["act"]["bits"] == 3 and rows["act"]["elements"] == 32 * 2 * 2 * 16
    assert divergence.first_divergence(list(rows.values())) is None


def test_departures_off_ties_keeps_the_inputs_that_start_away_from_a_boundary():
    rows = [{"tensor": "a", "inputs": {0: (2, 0.0), 3: (1, 0.3)}},
            {"tensor": "b", "inputs": {0: (5, 0.4), 1: (1, 2e-3), 2: (1, 5e-4)}}]
    assert divergence.first_divergence_per_input(rows) == {
        0: ("a", 2, 0.0), 1: ("b", 1, 2e-3), 2: ("b", 1, 5e-4), 3: ("a", 1, 0.3)}
    assert divergence.departures_off_ties(rows) == {1: ("b", 1, 2e-3), 3: ("a", 1, 0.3)}


@pytest.mark.parametrize("step_out, count, expected", [
    (1.0, 16, 17 / 16), (1.0, 4, 5 / 4), (0.5, 16, 9 / 16), (1.2, 9, 11 / 9), (0.05, 16, 0.05)])
def test_odd_ratio_step(step_out, count, expected):
    assert pool_steps.odd_ratio_step(1.0, step_out, count) == pytest.approx(expected, rel=1e-6)


def test_pooled_steps_are_snapped_off_exact_ties():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(-1, 1, (32, 16, 16, 3)).astype(np.float32)
    model = _with_head(_tiny_backbone(), (16, 16, 3))
    families.set_batch_norm_statistics(model, images)
    wrapped = mm.apply(model, mm.QuantConfig())
    mm.calibrate(wrapped, images)
    mm.select_bits(wrapped)
    mm.enable_weight_quantization(wrapped)
    pool, source = wrapped.get_layer("head_pool_oq"), wrapped.get_layer("b_out_relu_oq")
    assert pool.selected_step == pytest.approx(source.selected_step, rel=1e-5)  # the trap
    changed = pool_steps.snap_pooled_steps(wrapped)
    ratio = pool.selected_step * 16 / source.selected_step  # 4x4 pooled
    assert set(changed) == {"head_pool_oq"} and round(ratio) % 2 == 1
    assert ratio == pytest.approx(round(ratio), abs=1e-5)


@pytest.mark.slow
def test_nested_keras_applications_backbone_exports_to_int8(tmp_path):
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                              include_top=False, weights=None)
    images = families.images_for("MobileNetV2", 96, seed=0)
    _assert_exact(_export_nested(_with_head(backbone, (32, 32, 3)), images, tmp_path,
                                 ("Conv1", "expanded_conv_depthwise", "Conv_1")))


# Measured below 99.5% on 64 inputs with kernel rounding (benchmarks/export_families.py,
# docs/results/export_families_kernel_rounding.md; ResNet50(V2), DenseNet121, Xception, the
# EfficientNets, InceptionV3 and InceptionResNetV2 went to 100% with it).
_BELOW = {
    "ConvNeXtTiny": "measured 35.9% (41/64; BN-folded float graph 96.9%): the converter runs "
                    "the LayerNorms' channel mean as an int8 MEAN and GELU as int8 GELU",
}


_FLOAT_ISLANDS = ("ConvNeXtTiny",)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_family_exports_to_int8(name):
    report = families.export_family(name)
    v = report["verification"]
    assert report["float_layers"] == []
    # float islands (LayerNorm, GELU) only where the family has them, and listed
    assert bool(report["float_islands"]) == (name in _FLOAT_ISLANDS)
    if name not in _FLOAT_ISLANDS:
        assert report["graphs"]["int8"]["float_ops"] == []
    assert v["examples"] >= 64
    assert v["grid_check"]["all_on_grid"]
    agreement = v["tflite"]["int8"]["top1_agreement"]
    if agreement < 0.995 and name in _BELOW:
        pytest.xfail(f"{name}: {100 * agreement:.1f}%, {_BELOW[name]}")
    assert agreement >= 0.995


# -- the model zoo through the command-line scripts ------------------------------------------

_TINY_RUN = ["--pretrain_epochs=1", "--search_epochs=2", "--finetune_epochs=1",
             "--set", "search.warmup_epochs=1", "--set", "data.max_train_examples=128",
             "--set", "data.max_eval_examples=64", "--set", "data.batch_size=32",
             "--set", "data.eval_batch_size=64", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mobilenet_v2", "mobilenet_v3_small",
                                        "mobilenet_v3_large", "resnet18", "resnet50"])
def test_zoo_model_trains_and_exports_with_full_agreement(model_name, tmp_path):
    """``train.py --phase=all`` (tiny epochs) then ``export_tflite.py``: every quantized
    input on its grid and equal to final.keras's integers, and the int8 model agrees with
    final.keras on every eval image."""
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for script, flags in (("train.py", [f"--model={model_name}", *_TINY_RUN]),
                          ("export_tflite.py", ["--format=int8", "--latency_rounds=1",
                                                "--notensor_costs"])):
        subprocess.run([sys.executable, os.path.join(ROOT, script), f"--model_dir={run_dir}",
                        *flags], check=True, env=env, cwd=str(tmp_path))
    with open(os.path.join(run_dir, "export", "export_report.json")) as f:
        v = json.load(f)["verification"]
    assert v["examples"] == 64
    assert v["grid_check"]["all_on_grid"]
    # the Keras model rounds as the int8 kernels (kernel rounding): every quantized input's
    # integers equal, every prediction the same (before it, ResNet-50 and MobileNetV3-Large
    # departed at values within float32 noise of a rounding boundary)
    assert v["grid_check"]["min_match_keras"] == 1.0
    assert v["tflite"]["int8"]["top1_agreement"] == 1.0
