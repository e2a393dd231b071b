"""Tests for metamix_tf.export.bias_grid: the int32 bias grid of the int8 export inside weight
training (round-to-grid STE, the grid of each weight storage, the snap after training moving
nothing, exact int8 export)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_export import BITS, _data, _fit, _tiny_float_model

import metamix_tf as mm
from metamix_tf import config as config_lib
from metamix_tf.export import bias_grid, graph, grids, run

QUIET = dict(verbose=False, batch_size=32)


# ---------------------------------------------------------------------------------------------
# The pure functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [0.25, 0.1, 3e-4, 1.7])
def test_round_to_grid_forward_is_numpys_round_to_grid(unit):
    x = np.random.default_rng(0).normal(0, 50 * unit, 1000).astype(np.float32)
    x[:4] = np.float32(unit) * np.array([0.5, 1.5, -2.5, 0.0], np.float32)  # ties: to even
    got = bias_grid.round_to_grid(tf.constant(x), tf.constant(unit, tf.float32)).numpy()
    ratio = x / np.float32(unit)
    np.testing.assert_array_equal(got, np.float32(unit) * np.round(ratio))


def test_round_to_grid_gradient_is_straight_through():
    """dx = dy (exact for a power-of-two unit; one multiply and one divide otherwise, so
    within 2 float32 ulp), dunit = sum dy (round(x / u) - x / u) per channel."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(0, 1, (6, 3)).astype(np.float32))
    dy = tf.constant(rng.normal(0, 1, (6, 3)).astype(np.float32))
    for units, exact in (([0.25, 0.5, 2.0], True), ([0.1, 0.37, 3e-3], False)):
        unit = tf.constant(units, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch([x, unit])
            y = bias_grid.round_to_grid(x, unit)
        dx, du = tape.gradient(y, [x, unit], output_gradients=dy)
        if exact:
            np.testing.assert_array_equal(dx.numpy(), dy.numpy())
        else:
            np.testing.assert_allclose(dx.numpy(), dy.numpy(), rtol=2.4e-7, atol=0)
        r = x.numpy() / np.asarray(units, np.float32)
        np.testing.assert_allclose(du.numpy(), (dy.numpy() * (np.round(r) - r)).sum(0),
                                   rtol=1e-5, atol=1e-6)


def test_spread_multiplier_for_bias_is_the_closest_grid():
    """Brute force over every allowed multiplier, larger first on ties."""
    rng = np.random.default_rng(2)
    bias = rng.normal(0, 0.3, 40)
    unit = rng.uniform(1e-3, 5e-2, 40)
    largest = rng.integers(0, 9, 40).astype(np.float64)
    got = grids.spread_multiplier_for_bias(bias, unit, largest)
    for c in range(40):
        m_max = max(int(127 // max(largest[c], 1)), 1)
        units = [unit[c] / m for m in range(m_max, 0, -1)]
        errors = [abs(bias[c] - np.round(bias[c] / u) * u) for u in units]
        assert got[c] == m_max - int(np.argmin(errors))
    tf_got = grids.spread_multiplier_for_bias(tf.constant(bias, tf.float64),
                                              tf.constant(unit, tf.float64),
                                              tf.constant(largest, tf.float64),
                                              xp=bias_grid.TF_NUMPY)
    np.testing.assert_array_equal(tf_got.numpy(), got)


@pytest.mark.parametrize("storage,grid", [("spread", "spread"), ("bits", "bits")])
def test_storage_names_map_to_their_bias_grid(storage, grid):
    assert bias_grid.STORAGE_GRIDS[storage] == grid
    assert set(bias_grid.STORAGE_GRIDS) == set(graph.WEIGHT_STORAGE)


def test_unknown_storage_and_negative_epochs_are_refused():
    with pytest.raises(ValueError, match="`weight_storage` must be one of"):
        config_lib.FinetuneConfig(weight_storage="packed")
    with pytest.raises(ValueError, match="`bias_grid_epochs` must be None"):
        config_lib.FinetuneConfig(bias_grid_epochs=-1)


# ---------------------------------------------------------------------------------------------
# On a tiny trained model
# ---------------------------------------------------------------------------------------------


def _selected(seed: int = 0):
    """A tiny mixed-precision model in "selected" mode after a short float training."""
    keras.utils.set_random_seed(seed)
    train_x, train_y = _data(256, seed)
    float_model = _tiny_float_model()
    _fit(float_model, train_x, train_y, steps=64, lr=5e-3)
    model = mm.apply(float_model, mm.QuantConfig(candidate_bits=(2, 3, 4, 8), output_bits=8))
    mm.calibrate(model, train_x[:128])
    mm.select_bits(model, BITS)
    mm.enable_weight_quantization(model)
    return model, (train_x, train_y), _data(128, seed + 1)


@pytest.mark.parametrize("storage", ["spread", "bits"])
def test_shifts_are_the_exports_int32_rounding(storage):
    """In training the folded biases move to the points the export's own rounding
    (graph.with_int32_biases) puts them on, up to float32 (TF) vs float64 (export)
    arithmetic: within 1e-3 units."""
    model, _, _ = _selected()
    grid = bias_grid.BiasGrid(model, storage)
    export_plan = graph.int8_bias_plan(model, storage)
    twin = graph.with_int32_biases(export_plan)
    assert grid.layers == list(export_plan.weights) and not grid.skipped
    moved = 0.0
    for (_, delta), name in zip(grid.shifts(), grid.layers, strict=True):
        expected = twin.weights[name].folded.bias - export_plan.weights[name].folded.bias
        unit = graph._bias_unit(export_plan, name)
        np.testing.assert_allclose(delta.numpy() / unit, expected / unit, rtol=0, atol=1e-3)
        moved = max(moved, float(np.abs(expected / unit).max()))
    assert moved > 0.05  # float-trained biases are off their grids: the test can fail


@pytest.fixture(scope="module")
def tuned():
    model, train, test = _selected()
    result = mm.finetune(model, train, epochs=2, validation_data=test, **QUIET)
    return model, train, test, result


def test_after_training_on_the_grid_the_snap_moves_nothing(tuned):
    model, _, test, result = tuned
    snap = result.bias_snap
    assert snap["trained_on_grid"] and snap["layers"] == 7
    # the commit writes the rounded biases the last steps used: accuracy unchanged
    assert snap["val_acc_before"] == snap["val_acc_after"] == result.val_acc
    before = [v.numpy().copy() for v in model.weights]
    again = graph.snap_biases(model)
    assert again["moved"] == 0 and again["max_abs_shift"] == 0.0
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


def test_evaluation_on_the_grid_changes_no_variable():
    model, _, (test_x, test_y) = _selected()
    grid = bias_grid.BiasGrid(model)
    before = [v.numpy().copy() for v in model.weights]

    def evaluate(images, labels):
        return tf.reduce_sum(model(images, training=False))

    on_grid = grid.around(evaluate)(tf.constant(test_x), tf.constant(test_y))
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())
    graph.snap_biases(model)
    assert on_grid.numpy() == pytest.approx(float(evaluate(test_x, test_y)), rel=1e-5)


def test_grid_off_trains_float_biases_and_snaps_after():
    model, train, test = _selected()
    result = mm.finetune(model, train, epochs=1, validation_data=test, bias_grid_epochs=0,
                         **QUIET)
    assert not result.bias_snap["trained_on_grid"]
    assert result.bias_snap["max_shift_units"] > 0.05


@pytest.mark.slow
def test_int8_export_of_a_model_trained_on_the_grid_agrees_exactly(tuned, tmp_path):
    model, (train_x, _), (test_x, test_y), _ = tuned
    report = run.export_model(model, str(tmp_path), formats=("int8",), name="tiny",
                              calibration_data=train_x, eval_images=test_x,
                              eval_labels=test_y, bits_info={"searcher": "hand"},
                              latency_rounds=1, latency_runs=1, log=lambda _: None)
    v = report["verification"]
    int8 = v["tflite"]["int8"]
    assert int8["top1_agreement"] == 1.0
    assert int8["accuracy"] == v["reference_accuracy"]
    assert v["grid_check"]["min_match_keras"] >= 0.999  # as in test_export
