"""Integer input / output for the int8 model, and what on-device code needs to feed it.

With ``io_type`` ``"uint8"`` or ``"int8"`` the converter drops the int8 model's input QUANTIZE
and output DEQUANTIZE (:func:`metamix_tf.export.tflite.convert`): the input tensor is the
first quantized layer's 8-bit grid, so the app writes

    q = clip(round_half_away(x / input_scale) + input_zero_point, dtype range)

where ``x`` is the preprocessed float image (the training pipeline's normalisation applied to
the pixels), and reads logits as ``(q - output_zero_point) * output_scale``. Nothing else
changes, so the integer-I/O model predicts what the float-I/O int8 model predicts.

The TFLite Support metadata writer (``tflite-support`` 0.4.4, 2023) would pin protobuf 3.20,
which TF 2.21 cannot load; so the same facts go into a plain JSON document (:func:`io_spec`,
written as ``<name>_io.json`` with the labels in ``<name>_labels.txt``) and into the model
file itself as a flatbuffer ``Metadata`` entry named :data:`METADATA_NAME`
(:func:`add_metadata` / :func:`read_metadata`, LiteRT's own schema).
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["METADATA_NAME", "io_spec", "quantize", "dequantize", "run_integer_io",
           "add_metadata", "read_metadata"]

METADATA_NAME = "metamix_io"


def _tensor(detail: dict) -> dict:
    scale, zero_point = detail["quantization"]
    return {"name": detail["name"], "dtype": np.dtype(detail["dtype"]).name,
            "shape": [int(s) for s in detail["shape"]], "scale": float(scale),
            "zero_point": int(zero_point)}


def io_spec(model: bytes, labels: list | None = None, normalisation: str | None = None) -> dict:
    """The input and output tensors of a TFLite model (dtype, shape, scale, zero point), the
    formulas to feed and read them, the label names and the float normalisation."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    spec = {"input": _tensor(inp), "output": _tensor(out)}
    if spec["input"]["dtype"] != "float32":
        spec["input"]["formula"] = ("q = clip(round_half_away_from_zero(x / scale) + "
                                    "zero_point), x the normalised float image")
    if spec["output"]["dtype"] != "float32":
        spec["output"]["formula"] = "logit = (q - zero_point) * scale"
    spec["normalisation"] = normalisation
    spec["labels"] = list(labels) if labels is not None else None
    return spec


def quantize(x: np.ndarray, tensor: dict) -> np.ndarray:
    """Float images to the integer input tensor ``tensor`` (an :func:`io_spec` entry), rounding
    half away from zero as TFLite's QUANTIZE kernel does."""
    if tensor["dtype"] == "float32":
        return np.asarray(x, np.float32)
    info = np.iinfo(tensor["dtype"])
    r = np.asarray(x, np.float32) / np.float32(tensor["scale"])
    q = np.sign(r) * np.floor(np.abs(r) + 0.5) + tensor["zero_point"]
    return np.clip(q, info.min, info.max).astype(tensor["dtype"])


def dequantize(q: np.ndarray, tensor: dict) -> np.ndarray:
    """An integer output tensor back to float logits."""
    if tensor["dtype"] == "float32":
        return np.asarray(q, np.float32)
    return ((q.astype(np.int32) - tensor["zero_point"]) * np.float32(tensor["scale"])).astype(
        np.float32)


def run_integer_io(model_path: str, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Float logits of a (possibly) integer-I/O model over float ``images``: quantized in,
    dequantized out with the model's own input / output parameters."""
    from metamix_tf.export import verify

    with open(model_path, "rb") as f:
        spec = io_spec(f.read())
    interp = verify.interpreter(model_path)
    interp.allocate_tensors()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = quantize(images[start:start + batch_size], spec["input"])
        verify._resize(interp, len(batch))
        interp.set_tensor(interp.get_input_details()[0]["index"], np.ascontiguousarray(batch))
        interp.invoke()
        outputs.append(dequantize(np.array(interp.get_tensor(
            interp.get_output_details()[0]["index"])), spec["output"]))
    return np.concatenate(outputs)


def add_metadata(model: bytes, content: dict, name: str = METADATA_NAME) -> bytes:
    """``model`` with ``content`` (JSON) in a flatbuffer ``Metadata`` entry ``name``
    (replacing one of that name)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fb

    obj = fb.read_model_from_bytearray(bytearray(model))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(content).encode(), np.uint8)
    obj.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(obj.buffers) - 1
    obj.metadata = [m for m in (obj.metadata or []) if _name(m) != name] + [entry]
    return bytes(fb.convert_object_to_bytearray(obj))


def read_metadata(model: bytes, name: str = METADATA_NAME) -> dict | None:
    """The JSON of the ``Metadata`` entry ``name`` of a TFLite model (None if absent)."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    obj = fb.read_model_from_bytearray(bytearray(model))
    for m in obj.metadata or []:
        if _name(m) == name:
            return json.loads(bytes(np.asarray(obj.buffers[m.buffer].data, np.uint8)))
    return None


def _name(metadata) -> str:
    return metadata.name.decode() if isinstance(metadata.name, bytes) else metadata.name
