"""INT4 weight storage: the int8 TFLite model with every <= 4-bit kernel stored as a packed
INT4 tensor (two weights a byte), keeping its learned per-channel scale.

The TF converter has no int4 option, so :func:`pack_int4_weights` rewrites the int8 model the
converter wrote with ``weight_storage="int4"`` (the "bits" storage: each kernel holds its
b-bit integers with the learned per-channel steps, BatchNorm folded; the int32 bias unit is
``input_step * weight_step``). It changes only the kernels' tensor type (INT8 -> INT4), their
buffers (packed) and the operator versions that read INT4 filters (CONV_2D and
DEPTHWISE_CONV_2D v7, FULLY_CONNECTED v10); scales, zero points, biases and activations are
untouched, so the INT4 model computes exactly what the int8 one computes.

Libraries: the flatbuffer is read and written with ``ai_edge_litert.tools.flatbuffer_utils``
(the object API of LiteRT's own schema, already a dependency); the nibbles are packed with
``ai_edge_quantizer``'s ``pack_data``, the function its INT4 writer uses, so the byte layout
is the one LiteRT's kernels read (optional extra ``pip install metamix_tf[int4]``).
``ai_edge_quantizer``'s own quantization is not used: it starts from a float model and would
re-derive the scales (``max|w| / 7``), which is off the learned grid whenever a channel's
largest integer is -8 or its BatchNorm factor flips it.

A kernel whose folded integers leave ``[-8, 7]`` (a -8 in a channel whose BatchNorm factor is
negative becomes +8) has no exact INT4 form and stays int8; the report lists it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from metamix_tf.export.graph import ExportPlan

__all__ = ["INT4_MIN", "INT4_MAX", "OP_VERSIONS", "Int4Result", "pack_int4_weights",
           "int4_tensors"]

INT4_MIN, INT4_MAX = -8, 7
# Operator versions that accept an INT4 filter with int8 activations (LiteRT's
# register_ref / op_version tables).
OP_VERSIONS = {"CONV_2D": 7, "DEPTHWISE_CONV_2D": 7, "FULLY_CONNECTED": 10}


@dataclasses.dataclass
class Int4Result:
    """The INT4 model and what was packed."""

    model: bytes
    packed: dict  # layer -> {"op", "tensor", "bits", "int8_bytes", "int4_bytes"}
    kept_int8: dict  # layer (<= 4-bit weights) -> why it stays int8

    def to_dict(self) -> dict:
        return {"packed": self.packed, "kept_int8": self.kept_int8,
                "int4_layers": len(self.packed), "int8_kept_layers": len(self.kept_int8)}


def _flatbuffers():
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    return schema, flatbuffer_utils


def _pack_data():
    try:
        from ai_edge_quantizer.transformations.transformation_utils import pack_data
    except ImportError as error:
        raise ImportError("weight_storage='int4' needs ai-edge-quantizer: pip install "
                          "'metamix_tf[int4]' (or ai-edge-quantizer>=0.10). Received: "
                          f"import error {error}") from None
    return pack_data


def _op_name(schema, model, op) -> str:
    return _code_name(schema, model.operatorCodes[op.opcodeIndex])


def _code_name(schema, code) -> str:
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(builtin, str(builtin))


def pack_int4_weights(int8_model: bytes, export_plan: ExportPlan) -> Int4Result:
    """Rewrites an int8 model (converted from ``export_plan`` planned with
    ``weight_storage="int4"``) so that each kernel of <= 4 bits is an INT4 tensor.

    Each layer's kernel is found by its per-channel scales (the converter picks the names,
    the scales are the plan's). Raises ``ValueError`` if a <= 4-bit layer has no such kernel
    (a plan made with "spread" storage, or another model).
    """
    pack_data = _pack_data()
    schema, fb = _flatbuffers()
    model = fb.read_model_from_bytearray(bytearray(int8_model))
    subgraph = model.subgraphs[0]
    buffer_users = {}
    for sg in model.subgraphs:
        for t in sg.tensors:
            buffer_users[t.buffer] = buffer_users.get(t.buffer, 0) + 1
    wanted = {name: w for name, w in export_plan.weights.items() if w.bits <= 4}
    packed, kept, found, bumped = {}, {}, set(), set()
    for op in subgraph.operators:
        name = _op_name(schema, model, op)
        if name not in OP_VERSIONS or len(op.inputs) < 2:
            continue
        tensor = subgraph.tensors[op.inputs[1]]
        quant = tensor.quantization
        if tensor.type != schema.TensorType.INT8 or quant is None or quant.scale is None:
            continue
        scales = np.asarray(quant.scale, np.float32)
        layer = next((n for n, w in wanted.items() if n not in found
                      and w.folded.scale.size == scales.size
                      and np.allclose(scales, w.folded.scale.astype(np.float32), rtol=1e-6,
                                      atol=0)), None)
        if layer is None:
            continue
        found.add(layer)
        data = np.asarray(model.buffers[tensor.buffer].data, np.uint8).view(np.int8)
        low, high = int(data.min()), int(data.max())
        if low < INT4_MIN or high > INT4_MAX:
            kept[layer] = (f"folded integers in [{low}, {high}], outside INT4 [-8, 7] (a "
                           "negative BatchNorm factor flipped a -8)")
            continue
        if buffer_users[tensor.buffer] != 1:
            kept[layer] = "its buffer is shared with another tensor"
            continue
        model.buffers[tensor.buffer].data = np.asarray(pack_data(4, data), np.uint8)
        tensor.type = schema.TensorType.INT4
        bumped.add(op.opcodeIndex)
        packed[layer] = {"op": name, "tensor": tensor.name.decode() if isinstance(
            tensor.name, bytes) else tensor.name, "bits": wanted[layer].bits,
            "int8_bytes": int(data.size), "int4_bytes": int((data.size + 1) // 2)}
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(f"The int8 model has no int8 kernel with the scales of {missing[:3]} "
                         "(was it planned with weight_storage='int4'?). Received: "
                         f"missing_layers={len(missing)}")
    for index in bumped:
        code = model.operatorCodes[index]
        code.version = max(code.version, OP_VERSIONS[_code_name(schema, code)])
    data = bytes(fb.convert_object_to_bytearray(model))
    return Int4Result(model=data, packed=packed, kept_int8=kept)


def int4_tensors(model: bytes | str) -> dict:
    """``{tensor name: (op name, shape)}`` of every INT4 tensor of a TFLite model (read
    from the flatbuffer: the interpreter reports INT4 tensors unpacked)."""
    schema, fb = _flatbuffers()
    if isinstance(model, str):
        with open(model, "rb") as f:
            model = f.read()
    obj = fb.read_model_from_bytearray(bytearray(model))
    out = {}
    for sg in obj.subgraphs:
        for op in sg.operators:
            for i in op.inputs:
                t = sg.tensors[i] if i >= 0 else None
                if t is not None and t.type == schema.TensorType.INT4:
                    name = t.name.decode() if isinstance(t.name, bytes) else t.name
                    out[name] = (_op_name(schema, obj, op), tuple(int(s) for s in t.shape))
    return out
