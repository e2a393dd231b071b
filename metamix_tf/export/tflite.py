"""TFLite conversion of an inference graph (int8, float16, float32) and atomic file writes.

Every file is written under a temporary name in the target folder and renamed when it is
complete, so a failed export never leaves a half-written ``.tflite``, ``.keras`` or
SavedModel behind.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import tensorflow as tf

__all__ = [
    "FORMATS",
    "IO_TYPES",
    "ConversionError",
    "write_atomic",
    "atomic_directory",
    "save_keras",
    "export_saved_model",
    "convert",
    "graph_summary",
]

FORMATS = ("int8", "float16", "float32")
IO_TYPES = ("float32", "int8", "uint8")  # input / output tensor types of the int8 model
# Ops an all-int8 model may run in float: the float input's QUANTIZE, the logits' DEQUANTIZE.
_BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")


class ConversionError(RuntimeError):
    """The converter failed, or its int8 model still computes in float."""


def _temporary_path(path: str, suffix: str = "") -> str:
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    # The real extension last: Keras picks the format from it.
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp" + suffix,
                                   dir=folder)
    os.close(handle)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes | Callable[[str], None]) -> str:
    """Writes ``data`` (bytes, or a function that writes a file at the path it is given) to
    a temporary file beside ``path`` and renames it to ``path`` once complete."""
    tmp = _temporary_path(path, os.path.splitext(path)[1])
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; files are for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary folder beside ``path``; on success it replaces ``path``."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def save_keras(model, path: str) -> str:
    """``model.save(path)`` through a temporary file."""
    return write_atomic(path, lambda tmp: model.save(tmp))


def export_saved_model(model, path: str) -> str:
    """``model.export(path)`` (a TF SavedModel with a ``serve`` endpoint), atomically."""
    with atomic_directory(path) as tmp:
        target = os.path.join(tmp, "model")
        model.export(target, verbose=False)
        for name in os.listdir(target):
            os.replace(os.path.join(target, name), os.path.join(tmp, name))
        os.rmdir(target)
    return path


def convert(saved_model_dir: str, fmt: str, io_type: str = "float32",
            float_islands: bool = False) -> bytes:
    """Converts a SavedModel to TFLite.

    * ``"int8"``: the converter's quantization-aware path (``Optimize.DEFAULT`` on a graph
      whose every stored tensor has a fake quant): int8 tensors with exactly the fake quants'
      scales, per-channel int8 weights; float input and output. Raises
      :class:`ConversionError` if any op other than the input QUANTIZE / output DEQUANTIZE
      still runs in float.
    * ``"float16"``: float16 weights (``Optimize.DEFAULT`` with ``supported_types=[float16]``).
    * ``"float32"``: plain float.

    ``io_type`` (int8 only): ``"int8"`` / ``"uint8"`` make the input and output tensors
    integers (the converter's ``inference_input_type`` / ``inference_output_type``: the
    input QUANTIZE and output DEQUANTIZE go, see :mod:`metamix_tf.export.integer_io`).
    ``float_islands``: the plan runs some layers in float between int8 tensors
    (:attr:`~metamix_tf.export.graph.ExportPlan.float_islands`); their float ops are then
    expected (and listed by :func:`graph_summary`), not an error.
    """
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}. Received: fmt={fmt!r}")
    if io_type not in IO_TYPES or (io_type != "float32" and fmt != "int8"):
        raise ValueError(f"`io_type` must be one of {IO_TYPES}, integer types with the int8 "
                         f"format only. Received: io_type={io_type!r}, fmt={fmt!r}")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    if fmt in ("int8", "float16"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if io_type != "float32":
        converter.inference_input_type = converter.inference_output_type = tf.as_dtype(io_type)
    try:
        data = converter.convert()
    except Exception as e:  # the converter raises several unrelated types
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConversionError(f"The TFLite converter failed on the {fmt} model: {first[:500]}. "
                              f"Received: fmt={fmt!r}") from e
    if fmt == "int8" and not float_islands:
        summary = graph_summary(data)
        if summary["float_ops"]:
            raise ConversionError(
                "The int8 model still computes in float at "
                f"{summary['float_ops'][:5]} (this is a bug of the export plan: every tensor "
                "should carry a fake quant). Received: float_ops="
                f"{len(summary['float_ops'])}")
    return data


def _interpreter(model_content: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    return Interpreter(model_content=model_content,
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def graph_summary(model: bytes | str) -> dict:
    """Op counts, tensor types and the ops that compute in float, of a TFLite model.

    ``float_prefix_ops``: float ops that read only the model input, constants and other such
    ops (input preprocessing ahead of the input quantization); ``float_ops``: every other
    op with a float tensor, except the input QUANTIZE and output DEQUANTIZE.
    """
    if isinstance(model, str):
        with open(model, "rb") as f:
            model = f.read()
    interpreter = _interpreter(model)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    counts = collections.Counter(op["op_name"] for op in ops)
    produced = {i for op in ops for i in op["outputs"]}
    prefix_tensors = {d["index"] for d in interpreter.get_input_details()}
    float_ops, prefix_ops = [], []
    for op in ops:
        indices = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        is_float = lambda i: tensors[i]["dtype"] in (np.float32, np.float16)  # noqa: E731
        if op["op_name"] in _BOUNDARY_OPS or not any(is_float(i) for i in indices):
            continue
        variable = [i for i in op["inputs"] if i >= 0 and (i in produced or i in prefix_tensors)]
        if all(is_float(i) for i in indices) and all(i in prefix_tensors for i in variable):
            prefix_ops.append(op["op_name"])
            prefix_tensors.update(op["outputs"])
        else:
            float_ops.append(op["op_name"])
    dtypes = collections.Counter(np.dtype(t["dtype"]).name for t in tensors.values())
    return {"ops": dict(sorted(counts.items())), "num_ops": len(ops),
            "tensor_dtypes": dict(sorted(dtypes.items())), "float_ops": float_ops,
            "float_prefix_ops": prefix_ops}
