"""Export of trained MetaMix models to TFLite (int8, float16, float32), with verification.

The int8 model reproduces the searched mixed precision exactly: each b-bit activation is an
int8 tensor whose scale is the learned LSQ step, clamped to the b-bit range, and each 4-bit
kernel an int8 tensor holding 4-bit integers with the learned per-channel scales (BatchNorm
folded). See :mod:`metamix_tf.export.graph` for where the fake quants go and
:mod:`metamix_tf.export.run` for the files written.
"""

from metamix_tf.export import (
    aimet,
    encodings,
    graph,
    grids,
    int4,
    integer_io,
    kernel_rounding,
    kernels,
    layers,
    npu,
    tflite,
    verify,
)
from metamix_tf.export.graph import ExportPlan, UnsupportedModelError, build, plan
from metamix_tf.export.layers import FakeQuant, FoldedConv2D, FoldedDense, FoldedDepthwiseConv2D
from metamix_tf.export.run import (
    RunError,
    export_model,
    export_run,
    format_report,
    latest_run,
    load_run,
)
from metamix_tf.export.tflite import FORMATS, ConversionError

__all__ = [
    "FORMATS",
    "ConversionError",
    "ExportPlan",
    "FakeQuant",
    "FoldedConv2D",
    "FoldedDense",
    "FoldedDepthwiseConv2D",
    "RunError",
    "UnsupportedModelError",
    "aimet",
    "build",
    "encodings",
    "export_model",
    "export_run",
    "format_report",
    "graph",
    "grids",
    "int4",
    "integer_io",
    "kernel_rounding",
    "kernels",
    "latest_run",
    "layers",
    "load_run",
    "npu",
    "plan",
    "tflite",
    "verify",
]
