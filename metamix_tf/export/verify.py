"""Verification of exported TFLite models with the LiteRT interpreter (``ai_edge_litert``).

* :func:`keras_logits` / :func:`run_tflite`: logits of a Keras model / a ``.tflite`` file
  over a set of images.
* :func:`compare`: top-1 agreement with the Keras reference, logit differences, accuracies.
* :func:`check_grids`: reads every quantized layer's input tensor inside the int8 model
  (``experimental_preserve_all_tensors``, reference kernels) and checks that it is on that
  layer's b-bit grid: int8 scale equal to the learned step, the zero point of the grid (of
  the shifted grid, for an input stored shifted: :class:`~metamix_tf.export.grids.Shift`),
  every integer within ``[qmin, qmax]``.
* :func:`tflite_quantized_inputs` / :func:`reference_quantized_inputs` /
  :func:`match`: how often those integers equal the Keras model's, under the default
  (XNNPACK) kernels.
* :func:`tensor_costs`: the agreement each int8-only tensor costs on its own.
* :func:`latency`: int8 vs float median latency on this CPU, interleaved rounds.
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.export import graph as graph_lib
from metamix_tf.export import tflite
from metamix_tf.export.graph import ExportPlan
from metamix_tf.export.layers import FakeQuant

__all__ = [
    "interpreter",
    "keras_logits",
    "run_tflite",
    "compare",
    "LayerGridCheck",
    "check_grids",
    "reference_quantized_inputs",
    "graph_quantized_inputs",
    "tflite_quantized_inputs",
    "match",
    "tensor_costs",
    "latency",
]

_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def interpreter(model_path: str, num_threads: int | None = None, preserve: bool = False,
                delegates: bool = True):
    """A LiteRT interpreter; ``delegates=False`` uses the reference kernels only (needed to
    read intermediate tensors: a delegate does not keep them)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = (OpResolverType.AUTO if delegates
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return Interpreter(model_path=model_path, num_threads=num_threads,
                       experimental_preserve_all_tensors=preserve,
                       experimental_op_resolver_type=resolver)


def _resize(interp, batch: int) -> None:
    detail = interp.get_input_details()[0]
    if int(detail["shape"][0]) != batch:
        interp.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        interp.allocate_tensors()


def keras_logits(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Inference logits of ``model`` over ``images`` in batches. Eager calls: nothing traced,
    so the quantizers' current modes always apply."""
    return np.concatenate([
        keras.ops.convert_to_numpy(model(tf.convert_to_tensor(images[i:i + batch_size]),
                                         training=False))
        for i in range(0, len(images), batch_size)])


def run_tflite(model_path: str, images: np.ndarray, batch_size: int = 32,
               num_threads: int | None = None, delegates: bool = True) -> np.ndarray:
    """Runs a single-input, single-output TFLite model over ``images`` in batches
    (``delegates=False``: LiteRT's builtin kernels only, no XNNPACK)."""
    interp = interpreter(model_path, num_threads=num_threads, delegates=delegates)
    interp.allocate_tensors()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size], np.float32)
        _resize(interp, len(batch))
        interp.set_tensor(interp.get_input_details()[0]["index"], batch)
        interp.invoke()
        outputs.append(np.array(interp.get_tensor(interp.get_output_details()[0]["index"])))
    return np.concatenate(outputs).astype(np.float32)


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Top-1 agreement, max / mean absolute logit difference and both accuracies."""
    reference = np.asarray(reference, np.float64)
    logits = np.asarray(logits, np.float64)
    diff = np.abs(reference - logits)
    out = {
        "examples": int(len(reference)),
        "top1_agreement": float(np.mean(reference.argmax(-1) == logits.argmax(-1))),
        "disagreements": int(np.sum(reference.argmax(-1) != logits.argmax(-1))),
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0,
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        out["accuracy"] = float(np.mean(logits.argmax(-1) == labels))
        out["reference_accuracy"] = float(np.mean(reference.argmax(-1) == labels))
    return out


@dataclasses.dataclass
class LayerGridCheck:
    """The int8 model's input tensor of one quantized layer, against its b-bit grid."""

    layer: str
    bits: int
    signed: bool
    step: float
    int8_scale: float
    int8_zero_point: int
    qmin: int
    qmax: int
    value_min: int  # smallest grid integer seen (int8 value - zero point)
    value_max: int
    on_grid: bool  # scale and zero point match, every integer within [qmin, qmax]
    exact: bool  # the plan expects exact rounding (not a double rounding)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _find_weight_ops(interp, export_plan: ExportPlan) -> dict:
    """``{layer name: op}``: each quantized layer's conv / fully connected op, found by its
    per-channel weight scales (names are the converter's choice, the scales are ours)."""
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    found = {}
    for op in interp._get_ops_details():
        if op["op_name"] not in _WEIGHT_OPS or len(op["inputs"]) < 2:
            continue
        scales = tensors[op["inputs"][1]]["quantization_parameters"]["scales"]
        for name, weights in export_plan.weights.items():
            ours = weights.folded.scale.astype(np.float32)
            if name not in found and len(scales) == ours.size and np.allclose(
                    scales, ours, rtol=1e-5, atol=0):
                found[name] = op
                break
    return found


def reference_quantized_inputs(model: keras.Model, images: np.ndarray,
                               layers: list) -> dict:
    """``{layer: round(q(x) / step)}``: each quantized layer's input integers in the Keras
    fake-quantized ``model`` (its input quantizer applied to the probed float input)."""
    quant = [model.get_layer(name) for name in layers]
    probe = keras.Model(model.inputs, [layer.input for layer in quant])
    outs = probe(tf.convert_to_tensor(images), training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    result = {}
    for layer, x in zip(quant, outs, strict=True):
        q = layer.input_quantizer
        values = keras.ops.convert_to_numpy(q(x))
        result[layer.name] = np.round(values / q.selected_step).astype(np.int64)
    return result


def graph_quantized_inputs(inference_graph: keras.Model, export_plan: ExportPlan,
                           images: np.ndarray) -> dict:
    """``{layer: integers}``: each quantized layer's input in a Keras inference graph."""
    outs = _input_probe(inference_graph, export_plan)(tf.convert_to_tensor(images),
                                                      training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    shifted = any(isinstance(layer, FakeQuant) and layer.identity_bias
                  for layer in inference_graph.layers)
    return _integers(export_plan, [keras.ops.convert_to_numpy(o) for o in outs], shifted)


def tflite_quantized_inputs(inference_graph: keras.Model, export_plan: ExportPlan,
                            images: np.ndarray, workdir: str) -> dict:
    """``{layer: integers}``: each quantized layer's input in the int8 TFLite model, under
    the default kernels (XNNPACK), which is what deployment runs.

    A delegate keeps no intermediate tensors, so this converts a probe copy of the int8
    graph (``inference_graph``, the converter-native one) whose outputs are those inputs.
    """
    saved = os.path.join(workdir, "probe_saved_model")
    _input_probe(inference_graph, export_plan).export(saved, verbose=False)
    path = os.path.join(workdir, "probe_int8.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(saved, "int8",
                                float_islands=bool(export_plan.float_islands)))
    runner = interpreter(path).get_signature_runner()
    (input_name,) = runner.get_input_details()
    outputs = runner(**{input_name: np.ascontiguousarray(images, np.float32)})
    # Keras' SavedModel names the outputs output_<i>, in the probe's order
    return _integers(export_plan, [outputs[f"output_{i}"]
                                   for i in range(len(export_plan.inputs))], shifted=True)


def _input_probe(inference_graph: keras.Model, export_plan: ExportPlan) -> keras.Model:
    """``inference_graph`` with the quantized layers' inputs as outputs (plan order)."""
    return keras.Model(inference_graph.inputs,
                       [inference_graph.get_layer(n).input for n in export_plan.inputs])


def _integers(export_plan: ExportPlan, values: list, shifted: bool) -> dict:
    """``{layer: round(value / step)}`` for the probe's outputs, in plan order, less the
    shift of the inputs stored shifted (``shifted``: the converter-native graph)."""
    return {n: np.round(np.asarray(v) / p.step).astype(np.int64)
            - (p.shift_steps if shifted else 0)
            for (n, p), v in zip(export_plan.inputs.items(), values, strict=True)}


def match(reference: dict, values: dict) -> dict:
    """``{layer: {"match": fraction of equal integers, "max_int_diff": int}}``."""
    out = {}
    for name, v in values.items():
        ref = _crop_to(reference[name], v.shape) if name in reference else None
        if ref is None or ref.shape != v.shape:
            continue
        out[name] = {"match": float(np.mean(ref == v)),
                     "max_int_diff": int(np.abs(ref - v).max()) if v.size else 0}
    return out


def tensor_costs(export_plan: ExportPlan, images: np.ndarray, reference: np.ndarray,
                 logits_fn) -> list:
    """What each tensor that the Keras model keeps in float costs in top-1 agreement when
    it alone is stored at its int8 grid (the others stay float): a list of ``{"tensor",
    "kind", "top1_agreement", "mean_abs_logit_diff"}``, costliest first. ``logits_fn``
    maps a Keras model and images to logits."""
    rows = []
    exact = {k: t for k, t in export_plan.tensors.items() if t.kind in graph_lib.EXACT_KINDS}
    for name, t in export_plan.tensors.items():
        if t.kind in graph_lib.EXACT_KINDS:
            continue
        single = dataclasses.replace(export_plan, tensors={**exact, name: t})
        logits = logits_fn(graph_lib.build(single, native=True, twin=True), images)
        c = compare(reference, logits)
        rows.append({"tensor": name, "kind": t.kind, "top1_agreement": c["top1_agreement"],
                     "mean_abs_logit_diff": c["mean_abs_logit_diff"]})
    return sorted(rows, key=lambda r: (r["top1_agreement"], -r["mean_abs_logit_diff"]))


def _crop_to(reference: np.ndarray, shape: tuple) -> np.ndarray | None:
    """``reference`` cut to ``shape`` when the converter folded a zero padding into the op
    (the padding is on the bottom / right, as Keras' 'same' and MobileNetV2's
    ZeroPadding2D put the extra rows, or symmetric)."""
    if reference.shape == tuple(shape):
        return reference
    if reference.ndim != 4 or reference.shape[-1] != shape[-1]:
        return None
    dh, dw = reference.shape[1] - shape[1], reference.shape[2] - shape[2]
    if dh < 0 or dw < 0:
        return None
    top, left = dh // 2, dw // 2
    return reference[:, top:top + shape[1], left:left + shape[2], :]


def check_grids(model_path: str, export_plan: ExportPlan, images: np.ndarray) -> list:
    """Checks every quantized layer's input tensor of an int8 model (module docstring).

    Runs the reference kernels (a delegate keeps no intermediate tensors). Raises if a
    quantized layer's op cannot be found in the model.
    """
    interp = interpreter(model_path, preserve=True, delegates=False)
    interp.allocate_tensors()
    ops = _find_weight_ops(interp, export_plan)
    missing = sorted(set(export_plan.inputs) - set(ops))
    if missing:
        raise ValueError(f"The int8 model has no op with the weight scales of {missing[:5]}. "
                         f"Received: missing_layers={len(missing)}")
    _resize(interp, len(images))
    interp.set_tensor(interp.get_input_details()[0]["index"],
                      np.ascontiguousarray(images, np.float32))
    interp.invoke()
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    results = []
    for name, plan_input in export_plan.inputs.items():
        index = ops[name]["inputs"][0]
        detail = tensors[index]
        params = detail["quantization_parameters"]
        scale = float(params["scales"][0]) if len(params["scales"]) else 0.0
        zero_point = int(params["zero_points"][0]) if len(params["zero_points"]) else 0
        values = interp.get_tensor(index).astype(np.int64) - zero_point - plan_input.shift_steps
        grid = plan_input.grid
        on_grid = (detail["dtype"] == np.int8 and abs(scale - grid.scale) <= 1e-5 * grid.scale
                   and zero_point == plan_input.stored_grid.zero_point
                   and int(values.min()) >= grid.qmin and int(values.max()) <= grid.qmax)
        results.append(LayerGridCheck(
            layer=name, bits=plan_input.bits, signed=plan_input.signed, step=plan_input.step,
            int8_scale=scale, int8_zero_point=zero_point, qmin=grid.qmin, qmax=grid.qmax,
            value_min=int(values.min()), value_max=int(values.max()), on_grid=bool(on_grid),
            exact=plan_input.exact))
    return results


def latency(model_paths: dict, rounds: int = 5, runs_per_round: int = 20, warmup: int = 5,
            num_threads: int | None = 1) -> dict:
    """Median single-image latency (ms) of each model, measured side by side.

    Each round times every model in turn (``runs_per_round`` invokes each, after
    ``warmup``), so slow drifts of the machine hit all of them alike; the result is the
    median over all timed invokes, with the default delegates (XNNPACK on CPU).
    """
    interps = {}
    for key, path in model_paths.items():
        interp = interpreter(path, num_threads=num_threads)
        interp.allocate_tensors()
        _resize(interp, 1)
        detail = interp.get_input_details()[0]
        rng = np.random.default_rng(0)
        interp.set_tensor(detail["index"],
                          rng.uniform(-1, 1, detail["shape"]).astype(np.float32))
        for _ in range(warmup):
            interp.invoke()
        interps[key] = interp
    times = {key: [] for key in interps}
    for _ in range(rounds):
        for key, interp in interps.items():
            for _ in range(runs_per_round):
                start = time.perf_counter()
                interp.invoke()
                times[key].append(time.perf_counter() - start)
    return {key: {"median_ms": float(np.median(t) * 1e3),
                  "p90_ms": float(np.percentile(t, 90) * 1e3), "invokes": len(t),
                  "num_threads": num_threads, "file_bytes": os.path.getsize(model_paths[key])}
            for key, t in times.items()}
