"""Encodings of the int8 TFLite model in the AIMET / QNN format (``<name>_int8.encodings``).

AIMET's quantization encoding specification, version 0.6.1 (``Docs/api_docs/
quantization_encoding_specification.rst`` of github.com/quic/aimet): a JSON object with

* ``"version": "0.6.1"``;
* ``"activation_encodings"`` and ``"param_encodings"``: ``{tensor name: [Encoding, ...]}``,
  one Encoding per tensor, or one per output channel for a per-channel parameter, each
  ``{"bitwidth": int in [4, 32], "dtype": "int", "is_symmetric": "True" | "False",
  "max": float, "min": float, "offset": int, "scale": float}`` with ``min = offset * scale``
  and ``max = min + scale * (2^bitwidth - 1)``;
* ``"quantizer_args"``: how the encodings were made (``activation_bitwidth``, ``dtype``,
  ``is_symmetric``, ``param_bitwidth``, ``per_channel_quantization``, ``quant_scheme``).

A QNN / SNPE converter takes such a file as quantization overrides (``--quantization_overrides``)
for a graph whose tensor names it carries; the names here are the tensors of the int8
``.tflite`` (the INT4 file has the same names). Every quantized tensor of the file gets an
encoding: first the int8 / int32 quantization the file stores, then, for what MetaMix
searched and trained, its true grid:

* the input of each quantized layer: its b-bit LSQ grid (scale = learned step; offset
  ``-2^(b-1)`` signed, 0 unsigned or signed stored shifted by ``2^(b-1)``, see
  :class:`~metamix_tf.export.grids.Shift`). The format's smallest bit-width is 4: a 2- or
  3-bit input is written as the 4-bit grid with the same step (the graph clamps to the
  b-bit range: int8 saturation, ReLUs or MAXIMUM ops, so the values stay on the b-bit grid);
* each quantized kernel, per output channel (BatchNorm folded): its b-bit symmetric grid at
  the learned step, whatever the int8 storage (``"spread"`` multiplies the integers, not the
  real weights); a kernel whose folded integers leave ``[-2^(b-1), 2^(b-1) - 1]`` (a negative
  BatchNorm factor flips the sign of -2^(b-1)) keeps its int8 encoding.

The human-readable summary keyed by Keras layer names stays in ``<name>.encodings.json``
(:mod:`metamix_tf.export.encodings`).
"""

from __future__ import annotations

import numpy as np

from metamix_tf.export import verify
from metamix_tf.export.graph import ExportPlan
from metamix_tf.quant import ops

__all__ = ["VERSION", "ENCODING_FIELDS", "QUANTIZER_ARGS_FIELDS", "encoding", "aimet_encodings"]

VERSION = "0.6.1"
ENCODING_FIELDS = ("bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale")
QUANTIZER_ARGS_FIELDS = ("activation_bitwidth", "dtype", "is_symmetric", "param_bitwidth",
                         "per_channel_quantization", "quant_scheme")
MIN_BITWIDTH = 4


def encoding(bitwidth: int, scale: float, offset: int, symmetric: bool) -> dict:
    """One AIMET Encoding: the grid ``(offset + [0, 2^bitwidth - 1]) * scale``."""
    scale = float(scale)
    low = int(offset) * scale
    return {"bitwidth": int(bitwidth), "dtype": "int", "is_symmetric": str(bool(symmetric)),
            "max": low + scale * (2 ** int(bitwidth) - 1), "min": low, "offset": int(offset),
            "scale": scale}


def _stored(detail: dict) -> list | None:
    """The encodings of a tensor as the TFLite file stores it (None: not quantized)."""
    params = detail["quantization_parameters"]
    scales, zero_points = params["scales"], params["zero_points"]
    dtype = np.dtype(detail["dtype"])
    if len(scales) == 0 or dtype.kind not in "iu":
        return None
    bits = dtype.itemsize * 8
    lowest = int(np.iinfo(dtype).min)
    return [encoding(bits, s, lowest - int(z), int(z) == 0 and dtype.kind == "i")
            for s, z in zip(scales, zero_points, strict=True)]


def _activation(plan_input) -> list:
    bits = max(plan_input.bits, MIN_BITWIDTH)
    if plan_input.shift is not None:  # stored as q + 2^(b-1): the unsigned b-bit grid
        return [encoding(bits, plan_input.step, 0, False)]
    qn, _ = ops.quant_range(bits, plan_input.signed)
    return [encoding(bits, plan_input.step, -qn, plan_input.signed)]


def _kernel(weights) -> list | None:
    qn, qp = ops.quant_range(max(weights.bits, MIN_BITWIDTH), signed=True)
    low, high = weights.folded.integer_range
    if low < -qn or high > qp:
        return None
    return [encoding(max(weights.bits, MIN_BITWIDTH), s, -qn, True)
            for s in weights.folded.grid_scale]


def aimet_encodings(tflite_path: str, export_plan: ExportPlan) -> dict:
    """The AIMET 0.6.1 encodings of the int8 model at ``tflite_path`` (module docstring)."""
    interp = verify.interpreter(tflite_path, delegates=False)
    interp.allocate_tensors()
    details = {t["index"]: t for t in interp.get_tensor_details()}
    op_list = interp._get_ops_details()
    produced = {i for op in op_list for i in op["outputs"]}
    graph_inputs = {d["index"] for d in interp.get_input_details()}
    activations, params = {}, {}
    for index, detail in details.items():
        stored = _stored(detail)
        if stored is None:
            continue
        section = activations if index in produced or index in graph_inputs else params
        section[detail["name"]] = stored
    weight_ops = verify._find_weight_ops(interp, export_plan)
    kept = []
    for name, op in weight_ops.items():
        activations[details[op["inputs"][0]]["name"]] = _activation(export_plan.inputs[name])
        kernel = _kernel(export_plan.weights[name])
        if kernel is None:
            kept.append(name)
        else:
            params[details[op["inputs"][1]]["name"]] = kernel
    weight_bits = sorted({w.bits for w in export_plan.weights.values()})
    return {
        "version": VERSION,
        "activation_encodings": dict(sorted(activations.items())),
        "param_encodings": dict(sorted(params.items())),
        "quantizer_args": {
            "activation_bitwidth": 8,  # the int8 storage; searched bit-widths per tensor
            "dtype": "int",
            "is_symmetric": "True",  # the kernels (per channel, zero offset)
            "param_bitwidth": min(weight_bits) if weight_bits else 8,
            "per_channel_quantization": "True",
            "quant_scheme": "metamix_lsq_qat",  # learned LSQ steps, not a PTQ scheme
        },
    }
