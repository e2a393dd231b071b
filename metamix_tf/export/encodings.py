"""The encodings summary (``*.encodings.json``): every quantized tensor's bit-width, scale,
offset and signedness, keyed by the Keras layer it belongs to, for people and for a compiler
that runs each layer at its true bit-width (the same grids keyed by the ``.tflite``'s tensor
names, in the AIMET / QNN format: :mod:`metamix_tf.export.aimet`).

The entries follow the AIMET encodings layout (``bitwidth``, ``dtype``, ``is_symmetric``,
``min``, ``max``, ``offset``, ``scale``; ``min = offset * scale``) with MetaMix's fields added:

* ``activation_encodings``: the input of each quantized layer at its searched bit-width
  (``offset`` -2^(b-1) signed, 0 unsigned), with the int8 scale and zero point the int8
  TFLite model stores it in and whether the int8 model rounds it exactly as Keras does.
* ``param_encodings``: each quantized layer's kernel, per output channel, after BatchNorm
  folding (``scale`` per channel, ``offset`` -2^(b-1), integers in ``int_range``); the int8
  TFLite model stores ``integer * int8_multiplier`` at ``scale / int8_multiplier`` (the
  multiplier is 1 unless the export spread the weights over the int8 range).
* ``int8_only_encodings``: tensors that no quantized layer reads but the int8 model stores
  (residual adds, pooling inputs, logits): ``kind`` ``"quantized"`` at the grid of the
  Keras model's output quantizer, or ``"calibrated"`` / ``"shared"`` at 8 bits from
  calibration when the Keras model keeps them in float.
"""

from __future__ import annotations

import json

import numpy as np

from metamix_tf.export.graph import ExportPlan
from metamix_tf.export.tflite import write_atomic
from metamix_tf.quant import ops

__all__ = ["ENCODINGS_VERSION", "encodings", "write"]

ENCODINGS_VERSION = "metamix_tf.encodings/1"


def _activation(plan_input, tensor) -> dict:
    g = plan_input.grid
    entry = {
        "bitwidth": plan_input.bits,
        "dtype": "int",
        "is_symmetric": plan_input.signed,
        "signed": plan_input.signed,
        "scale": plan_input.step,
        "offset": g.qmin,
        "min": g.qmin * plan_input.step,
        "max": g.qmax * plan_input.step,
        "qmin": g.qmin,
        "qmax": g.qmax,
        "int8_scale": g.scale,
        "int8_zero_point": plan_input.stored_grid.zero_point,
        "int8_shift_steps": plan_input.shift_steps,  # stored as q + this (grids.Shift)
        "source_tensor": plan_input.source,
        "requantized": plan_input.requantized,
        "exact_in_int8": plan_input.exact,
    }
    if tensor is not None and plan_input.requantized:
        entry["requantized_from"] = {"scale": tensor.grid.scale,
                                     "zero_point": tensor.grid.zero_point, "k": tensor.k}
    return entry


def _params(weights) -> dict:
    folded = weights.folded
    qn, qp = ops.quant_range(weights.bits, signed=True)
    low, high = folded.integer_range
    scale = [float(s) for s in folded.grid_scale]
    return {
        "bitwidth": weights.bits,
        "dtype": "int",
        "is_symmetric": True,
        "axis": -1,
        "layer_type": weights.layer_type,
        "offset": -qn,
        "scale": scale,
        "min": [-qn * s for s in scale],
        "max": [qp * s for s in scale],
        "int_range": [low, high],
        "within_bitwidth": bool(-qn <= low and high <= qp),
        "batch_norm_folded": weights.batch_norm,
        "negated_channels": int(np.sum(folded.negated)),
        "clipped_to_int8": weights.clipped,
        "int8_multiplier": [int(m) for m in folded.multiplier],
        "bias": [float(b) for b in folded.bias],
    }


def encodings(export_plan: ExportPlan, bits_info: dict | None = None,
              input_name: str | None = None) -> dict:
    """The sidecar as a dict (JSON ready).

    ``bits_info``: the run's ``bits.json`` (``searcher``, ``gbops``, ``target_gbops``,
    ``avg_activation_bits``; the model-level numbers are copied from it).
    """
    bits_info = dict(bits_info or {})
    activations = {name: _activation(p, export_plan.tensors.get(p.source))
                   for name, p in export_plan.inputs.items()}
    int8_only = {}
    for t in export_plan.calibrated + export_plan.output_quantized:
        g = t.grid
        int8_only[t.name] = {
            "bitwidth": g.bits, "dtype": "int", "is_symmetric": g.qmin == -2 ** (g.bits - 1),
            "scale": g.scale, "offset": g.qmin, "min": g.min_value, "max": g.max_value,
            "int8_zero_point": g.zero_point, "kind": t.kind, "k": t.k,
            "calibrated_range": list(t.calibrated_range) if t.calibrated_range else None,
            "quantized_readers": t.quant_readers,
            "float_readers": [r for r in t.float_readers],
        }
    bits = [p.bits for p in export_plan.inputs.values()]
    return {
        "version": ENCODINGS_VERSION,
        "model": export_plan.model_name,
        "searcher": bits_info.get("searcher"),
        "gbops": bits_info.get("gbops"),
        "target_gbops": bits_info.get("target_gbops"),
        "avg_activation_bits": bits_info.get("avg_activation_bits",
                                             float(np.mean(bits)) if bits else None),
        "activation_bits": {name: p.bits for name, p in export_plan.inputs.items()},
        "weight_bits": {name: w.bits for name, w in export_plan.weights.items()},
        "input": {"tensor": input_name, "dtype": "float32",
                  "note": "the TFLite models take float32 preprocessed images; the int8 model "
                          "quantizes them with the first layer's activation encoding"},
        "activation_encodings": activations,
        "param_encodings": {name: _params(w) for name, w in export_plan.weights.items()},
        "int8_only_encodings": int8_only,
    }


def write(path: str, content: dict) -> str:
    """Writes the sidecar as indented JSON, atomically."""
    return write_atomic(path, (json.dumps(content, indent=1) + "\n").encode())
