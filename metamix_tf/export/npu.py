"""Ahead-of-time NPU compilation of an exported ``.tflite`` with LiteRT's AOT path.

:func:`compile_model` calls ``ai_edge_litert.aot.aot_compile.aot_compile`` for every target
LiteRT registers (Qualcomm, MediaTek, Google Tensor, Intel OpenVINO, Samsung SoCs) with
``keep_going=True`` and returns, per vendor, the targets that compiled (with the compiled
file's size) and, for the others, the compiler plugin's own error. The vendor toolchains come
from the ``ai-edge-litert-sdk-<vendor>`` packages, whose build downloads them from the
vendors' sites. ``benchmarks/npu_aot.py`` prints the table of the README.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

__all__ = ["compile_model"]


def _plugin_error(message: str) -> str:
    """The plugin's reason: the first error lines of the file ``message`` points to."""
    path = message.split("See ")[-1].split(" for details")[0] if "See " in message else None
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            text = [x.strip() for x in f if x.strip() and not x.startswith("INFO")]
        os.remove(path)
        first = next((i for i, x in enumerate(text) if "ERROR" in x or "Failed" in x), None)
        if first is not None:
            return " ".join(text[first:first + 3])[:500]
    return message[:500]


def _vendor(backend) -> str:
    return type(backend).__name__.replace("Backend", "")


def compile_model(path: str) -> dict:
    """``{vendor: {"compiled": [{"target", "bytes"}], "failed": {target: reason}}}`` for the
    TFLite file at ``path`` (the CPU fallback model the AOT path always returns is left out)."""
    from ai_edge_litert.aot import aot_compile

    by_vendor = collections.defaultdict(lambda: {"compiled": [], "failed": {}})
    with tempfile.TemporaryDirectory() as out:
        result = aot_compile.aot_compile(path, output_dir=out, keep_going=True)
        files = glob.glob(os.path.join(out, "*.tflite"))
        for backend, _ in result.models_with_backend:
            if _vendor(backend) == "Fallback":
                continue
            target = str(getattr(backend, "target", _vendor(backend)))
            sizes = [os.path.getsize(f) for f in files if target.split("_")[-1] in f]
            by_vendor[_vendor(backend)]["compiled"].append(
                {"target": target, "bytes": sizes[0] if sizes else None})
        for backend, message in result.failed_backends:
            target = str(getattr(backend, "target", _vendor(backend)))
            by_vendor[_vendor(backend)]["failed"][target] = _plugin_error(message)
    return dict(by_vendor)
