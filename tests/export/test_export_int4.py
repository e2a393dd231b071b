"""Tests for metamix_tf.export.int4: ``weight_storage="int4"`` on the tiny mixed-precision
model of test_export (4-bit weights everywhere but the 8-bit first and last layers), checked
with the LiteRT interpreter. Slow (a tiny model trained and exported, ~4 min on 2 busy
cores): .ci/run runs it after the default suite."""

import numpy as np
import pytest

from metamix_tf.export import graph, int4, run, verify
from metamix_tf.quant import wrap

pytest.importorskip("ai_edge_quantizer")  # the [int4] extra; .ci/run installs it
pytestmark = pytest.mark.slow

from test_export import _train_tiny  # noqa: E402


@pytest.fixture(scope="module")
def exported_int4(tmp_path_factory):
    model, (train_x, _), (test_x, test_y) = _train_tiny(snap=False)
    graph.snap_biases(model, weight_storage="int4")  # the bias grid of the exported storage
    out = str(tmp_path_factory.mktemp("export_int4"))
    report = run.export_model(model, out, ["int8"], name="tiny", calibration_data=train_x,
                              eval_images=test_x, eval_labels=test_y, weight_storage="int4",
                              latency_rounds=1, latency_runs=3, tensor_costs=False,
                              log=lambda _: None)
    plan = graph.plan(model, calibration_data=train_x, weight_storage="int4")
    return report, out, plan, test_x, model


def test_every_4_bit_kernel_is_an_int4_tensor(exported_int4):
    report, out, plan, _, _ = exported_int4
    four_bit = {n for n, w in plan.weights.items() if w.bits <= 4}
    assert four_bit and len(four_bit) < len(plan.weights)  # the 8-bit first / last stay int8
    summary = report["graphs"]["int4"]
    assert set(summary["packed"]) | set(summary["kept_int8"]) == four_bit
    tensors = int4.int4_tensors(f"{out}/tiny_int4.tflite")
    assert len(tensors) == len(summary["packed"]) > 0
    assert {op for op, _ in tensors.values()} <= set(int4.OP_VERSIONS)
    assert int4.int4_tensors(f"{out}/tiny_int8.tflite") == {}
    saved = sum(p["int8_bytes"] - p["int4_bytes"] for p in summary["packed"].values())
    files = report["files"]
    assert files["int8"]["bytes"] - files["int4"]["bytes"] >= saved - 64  # flatbuffer padding


def test_int4_model_computes_the_int8_model_exactly(exported_int4):
    report, out, _, images, _ = exported_int4
    a = verify.run_tflite(f"{out}/tiny_int8.tflite", images, delegates=False)
    b = verify.run_tflite(f"{out}/tiny_int4.tflite", images, delegates=False)
    np.testing.assert_array_equal(a, b)
    g = report["verification"]["int4_grid_check"]
    assert g["all_on_grid"] and g["builtin_kernels_int4_vs_int8_max_abs_diff"] == 0.0


def test_int4_storage_int8_model_agrees_with_keras(exported_int4):
    report, _, _, _, _ = exported_int4
    t = report["verification"]["tflite"]
    # biases snapped to the "bits" grid: the int8 file (XNNPACK) is the Keras model
    assert t["int8"]["top1_agreement"] == 1.0
    assert report["verification"]["grid_check"]["all_on_grid"]


def test_int4_model_agrees_with_keras_rounding_as_the_builtin_kernels(exported_int4):
    """The INT4 convs run on LiteRT's builtin kernels (fixed-point requantization): with
    those tensors rounded so, the Keras model gives the INT4 file's predictions."""
    report, _, _, _, model = exported_int4
    t = report["verification"]["tflite"]
    assert t["int4"]["top1_agreement"] == 1.0
    assert set(t["int4"]["kernel_rounding"]) == set(report["kernel_rounding"])
    assert "top1_agreement" in t["int4"]["vs_int8_rounding_keras"]
    assert "int4 reference: the Keras model rounding" in run.format_report(report)
    # the export leaves the model rounding as the int8 file's kernels
    forms = [q.kernel_rounding for q in wrap.activation_quantizers(model)
             if q.kernel_rounding is not None]
    assert forms and all("multiplier" not in f for f in forms)
    assert sum("scale" in f for f in forms) >= len(report["graphs"]["int4"]["packed"])


def test_int4_packing_refuses_a_spread_plan(exported_int4):
    _, out, _, _, model = exported_int4
    spread = graph.plan(model, int8=False, weight_storage="spread")
    with open(f"{out}/tiny_int8.tflite", "rb") as f:
        data = f.read()
    with pytest.raises(ValueError, match="weight_storage='int4'"):
        int4.pack_int4_weights(data, spread)


def test_int4_storage_needs_the_int8_format(tmp_path):
    with pytest.raises(ValueError, match="add int8 to the formats"):
        run.export_model(None, str(tmp_path), ["float32"], weight_storage="int4")
