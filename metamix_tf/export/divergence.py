"""Where the int8 model first departs from the Keras model: every tensor both round on the
same grid, compared integer by integer, in graph order.

The tensors are the plan's exact ones (:data:`~metamix_tf.export.graph.EXACT_KINDS`
``"grid"`` and ``"quantized"``): the int8 model's values come from a probe copy of the
converter-native graph whose outputs are those tensors, run under the default (XNNPACK)
kernels, as deployment runs; the Keras model's from its own quantizer applied to the float
tensor it rounds. For each tensor that differs, ``max_tie_distance`` is the largest
``| frac(x / step) - 1/2 |`` of the Keras model's float values where the integers differ:
near 0 when the Keras model sat on a rounding boundary (float32 summation noise decides),
large when the difference was carried in from an earlier tensor or is a real error.
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.export import graph, kernel_rounding, tflite, verify
from metamix_tf.export.graph import ExportPlan

__all__ = ["FLOAT32_TIE", "stored_tensor_divergence", "model_divergence", "run_divergence",
           "first_divergence", "first_divergence_per_input", "departures_off_ties"]

# Largest |frac(x / step) - 1/2| at which float32 noise can still decide a rounding: the Keras
# value of x / step carries its conv's accumulation error, about sqrt(K) * 2^-24 * |x / step|
# for K products (ResNet-50's 3x3x512 conv at 100 steps: 76 * 6e-8 * 100 = 5e-4 of a step).
# A departure farther from a tie is carried in or a rule error (NASNet's rescaling ReLU,
# since fixed: 0.21 of a step).
FLOAT32_TIE = 1e-3


def stored_tensor_divergence(model: keras.Model, export_plan: ExportPlan,
                             inference_graph: keras.Model, images: np.ndarray,
                             workdir: str) -> list:
    """One row per exact stored tensor, in graph order: ``{"tensor", "kind", "bits",
    "elements", "mismatches", "max_tie_distance", "first": [(index, keras x / step, keras
    integer, int8 integer), ...], "inputs": {input index: (mismatches, max tie distance)}}``
    (module docstring). ``inference_graph``: the
    converter-native graph of ``export_plan``."""
    items = [(t, x, q) for t, x, q in kernel_rounding.rounding_quantizers(model, export_plan)
             if t.fake_quant in {layer.name for layer in inference_graph.layers}]
    probe = keras.Model(inference_graph.inputs,
                        [inference_graph.get_layer(t.fake_quant).output for t, _, _ in items])
    saved = os.path.join(workdir, "divergence_saved_model")
    probe.export(saved, verbose=False)
    path = os.path.join(workdir, "divergence_int8.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(saved, "int8",
                                float_islands=bool(export_plan.float_islands)))
    runner = verify.interpreter(path).get_signature_runner()
    (input_name,) = runner.get_input_details()
    int8 = runner(**{input_name: np.ascontiguousarray(images, np.float32)})
    floats = keras.Model(model.inputs, [x for _, x, _ in items])(
        tf.convert_to_tensor(images), training=False)
    floats = floats if isinstance(floats, (list, tuple)) else [floats]
    rows = []
    for i, ((t, _, q), x) in enumerate(zip(items, floats, strict=True)):
        step = float(q.selected_step)
        x = keras.ops.convert_to_numpy(x)
        reference = np.round(keras.ops.convert_to_numpy(q(x)) / step).astype(np.int64)
        values = np.round(np.asarray(int8[f"output_{i}"]) / t.grid.scale).astype(np.int64)
        ratio = x / step
        if reference.shape != values.shape:  # a padding the converter folded into the op
            reference = verify._crop_to(reference, values.shape)
            ratio = verify._crop_to(ratio, values.shape)
            if reference is None:
                continue
        bad = np.argwhere(reference != values)
        at = tuple(bad.T)
        ties = np.abs(ratio[at] - np.floor(ratio[at]) - 0.5) if len(bad) else np.zeros(0)
        per_input = {}
        for image in np.unique(bad[:, 0]) if len(bad) else []:
            mine = bad[:, 0] == image
            per_input[int(image)] = (int(mine.sum()), float(ties[mine].max()))
        rows.append({
            "tensor": t.name, "kind": t.kind, "bits": int(q.selected_bits),
            "elements": int(values.size), "mismatches": int(len(bad)),
            "max_tie_distance": float(ties.max()) if len(bad) else None,
            "first": [(tuple(int(j) for j in b), float(ratio[tuple(b)]),
                       int(reference[tuple(b)]), int(values[tuple(b)])) for b in bad[:4]],
            "inputs": per_input})
    return rows


def model_divergence(model: keras.Model, calibration: np.ndarray, images: np.ndarray) -> list:
    """:func:`stored_tensor_divergence` of ``model``'s export planned on ``calibration``."""
    export_plan = graph.plan(model, calibration)
    kernel_rounding.set_kernel_rounding(model, export_plan)  # as the export does
    with tempfile.TemporaryDirectory() as tmp:
        return stored_tensor_divergence(model, export_plan,
                                        graph.build(export_plan, native=True), images, tmp)


def run_divergence(model_dir: str, examples: int = 64, calibration_examples: int = 256) -> list:
    """:func:`model_divergence` of a ``train.py`` run's ``final.keras`` on its first
    ``examples`` eval images, calibrated on its training images as ``export_tflite.py`` is."""
    from metamix_tf.export import run as export_run  # it imports this module's exporters

    run = export_run.load_run(model_dir)
    calibration, images, *_ = export_run._run_data(run, examples, calibration_examples)
    return model_divergence(run.model, calibration, images)


def first_divergence(rows: list) -> dict | None:
    """The first row (graph order) whose integers differ, or None."""
    return next((r for r in rows if r["mismatches"]), None)


def first_divergence_per_input(rows: list) -> dict:
    """``{input index: (tensor, mismatches, max tie distance)}``: for each input whose
    integers differ anywhere, the first tensor (graph order) where they do. A tie distance
    near 0 there means the input's departure began at a float32 rounding boundary."""
    out: dict = {}
    for r in rows:
        for image, (count, tie) in r.get("inputs", {}).items():
            out.setdefault(image, (r["tensor"], count, tie))
    return dict(sorted(out.items()))


def departures_off_ties(rows: list, tie: float = FLOAT32_TIE) -> dict:
    """The entries of :func:`first_divergence_per_input` whose first differing tensor is
    farther than ``tie`` from a rounding boundary: departures float32 noise cannot explain."""
    return {image: start for image, start in first_divergence_per_input(rows).items()
            if start[2] > tie}
