"""One rule table for :func:`metamix_tf.apply` and the int8 export: which tensors an int8
model stores, which layers only move values (shape-only, identities), which activations
TFLite fuses into the op before them, and which BatchNormalization layers fold.

``apply()`` puts an output quantizer on every tensor :func:`stores` says the int8 model keeps
(unless a quantized layer reads it), and the export (:mod:`metamix_tf.export.graph`) stores
exactly those tensors, so the Keras model rounds what the int8 model rounds.

Graph nodes here are Keras *operations*: layers, and the ``keras.ops`` calls of a
functional graph (e.g. MobileNetV3's hard-sigmoid ``relu6(x + 3) * (1 / 6)``).
"""

from __future__ import annotations

import keras

__all__ = [
    "SHAPE_ONLY",
    "IDENTITY",
    "SIGN_PRESERVING",
    "WEIGHTED",
    "INT8_ACTIVATIONS",
    "FUSABLE_ACTIVATIONS",
    "NON_NEGATIVE_ACTIVATIONS",
    "HARD_SWISH",
    "activation_name",
    "is_identity",
    "is_shape_only",
    "is_fusable_activation",
    "is_elementwise_op",
    "is_float_op",
    "FLOAT_ISLANDS",
    "FLOAT_ISLAND_ACTIVATIONS",
    "is_float_island",
    "fuses_activation",
    "folds_batch_norm",
    "stores",
    "quantizes_output",
    "shared_by_quantized",
    "producer",
    "readers",
]

L = keras.layers
# Commute with rounding to a grid that holds 0 (selection, zero padding, shape).
SHAPE_ONLY = (L.ZeroPadding2D, L.Cropping2D, L.MaxPooling2D, L.GlobalMaxPooling2D, L.Flatten,
              L.Reshape)
# Identities at inference.
IDENTITY = (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
            L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.Identity,
            L.ActivityRegularization)
# Keep the sign of their input (looked through to decide a quantizer's signedness).
SIGN_PRESERVING = SHAPE_ONLY + IDENTITY + (L.GlobalAveragePooling2D, L.AveragePooling2D)
# Layers with multiply-accumulates that apply() quantizes (quantized ones subclass them).
WEIGHTED = (L.Conv2D, L.DepthwiseConv2D, L.Dense)
# Weightless layers with int8 TFLite kernels; they store their inputs.
_FLOAT_LAYERS = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum,
                 L.Concatenate, L.GlobalAveragePooling2D, L.AveragePooling2D, L.ReLU,
                 L.Activation, L.Softmax)
# keras.ops calls in a functional graph with an int8 TFLite kernel (a tensor and a constant).
_ELEMENTWISE_OPS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")
# Ops with no exact int8 form that the int8 model runs in float between int8 tensors
# (transformer-style parts of ConvNeXt): they store their int8 input (an output quantizer in
# Keras), dequantize it, compute in float and quantize their output for its readers.
FLOAT_ISLANDS = (L.LayerNormalization, L.GroupNormalization)
FLOAT_ISLAND_ACTIVATIONS = ("gelu",)
INT8_ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "hard_swish",
                    "hard_silu", "silu", "swish", "tanh", "softmax")
FUSABLE_ACTIVATIONS = ("relu", "relu6")
NON_NEGATIVE_ACTIVATIONS = ("relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "softplus")
# Keras 3 names the hard-swish function ``hard_silu`` (``Activation("hard_swish")`` holds it).
HARD_SWISH = ("hard_swish", "hard_silu")
OUTPUT = object()  # a reader that stands for "read as a model output"


def activation_name(layer) -> str | None:
    """The activation function's name of a layer (``"relu"`` for a ``ReLU`` layer)."""
    if isinstance(layer, L.ReLU):
        return "relu"
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", None) if act is not None else None


def is_identity(layer) -> bool:
    return isinstance(layer, IDENTITY) or (
        isinstance(layer, L.Activation) and activation_name(layer) == "linear")


def is_shape_only(layer) -> bool:
    return isinstance(layer, SHAPE_ONLY)


def is_fusable_activation(layer) -> bool:
    """A ReLU / ReLU6 that TFLite fuses into the conv, fully connected or add before it."""
    if isinstance(layer, L.ReLU):
        return (float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0
                and layer.max_value in (None, 6.0))
    return isinstance(layer, L.Activation) and activation_name(layer) in FUSABLE_ACTIVATIONS


def is_elementwise_op(op) -> bool:
    """A ``keras.ops`` call (not a layer) with an int8 TFLite kernel, e.g. ``x + 3``."""
    return not isinstance(op, L.Layer) and type(op).__name__ in _ELEMENTWISE_OPS


def is_float_op(op) -> bool:
    """A weightless op that an int8 model runs on stored int8 tensors."""
    return isinstance(op, _FLOAT_LAYERS) or is_elementwise_op(op)


def is_float_island(op) -> bool:
    """A layer the int8 model runs in float between int8 tensors (:data:`FLOAT_ISLANDS`)."""
    return isinstance(op, FLOAT_ISLANDS) or (
        isinstance(op, L.Activation) and activation_name(op) in FLOAT_ISLAND_ACTIVATIONS)


def fuses_activation(op) -> bool:
    """Whether TFLite fuses a following ReLU / ReLU6 into ``op`` (conv, depthwise conv,
    fully connected, a BatchNorm run as a 1x1 depthwise conv, add, subtract)."""
    return isinstance(op, WEIGHTED + (L.BatchNormalization, L.Add, L.Subtract)) or (
        is_elementwise_op(op) and type(op).__name__ in ("Add", "Subtract"))


def folds_batch_norm(bn, source, source_readers: int) -> bool:
    """Whether BatchNormalization ``bn`` folds into ``source``, the op that computes its
    input: a conv / depthwise conv / dense with a linear activation read by ``bn`` only."""
    return (isinstance(bn, L.BatchNormalization) and isinstance(source, WEIGHTED)
            and activation_name(source) in (None, "linear") and source_readers == 1)


def stores(source, reader, source_readers: int) -> bool:
    """Whether the int8 model stores the tensor computed by ``source`` because ``reader``
    reads it (``reader`` is an operation or :data:`OUTPUT`; ``source_readers`` counts
    ``source``'s readers). Shape-only layers and identities are looked through by the
    callers; a quantized layer's input quantizer is not a storing reader here.

    Stored: the model outputs; the inputs of weightless int8 ops (adds, multiplies,
    concatenations, pooling, activations that are not fused), of a BatchNormalization
    that does not fold (it runs as a 1x1 depthwise conv) and of a float island. Not stored:
    a conv's output read only by its ReLU / ReLU6 (fused) or only by its BatchNorm
    (folded).
    """
    if reader is OUTPUT:
        return True
    if isinstance(reader, L.BatchNormalization):
        return not folds_batch_norm(reader, source, source_readers)
    if is_fusable_activation(reader):
        return not (fuses_activation(source) and source_readers == 1)
    if isinstance(reader, L.Concatenate):
        # TFLite concatenates int8 tensors of one scale: the concatenation's own output
        # quantizer rounds an input that nothing else reads (see quantizes_output)
        return source_readers > 1
    return is_float_op(reader) or is_float_island(reader)


def quantizes_output(op) -> bool:
    """Concatenations get an output quantizer: TFLite concatenates int8 tensors of one
    scale, so every input is rounded to (or requantized to) the output's grid.

    Average-pooling outputs get their own 8-bit output quantizer: the TFLite converter
    cannot clamp a pooling output to a reader's b-bit range without first rounding it to
    the input's scale, so the reader requantizes from the 8-bit grid instead. The export
    runs the pooling as depthwise convs with weights ``1 / count`` (a 'same' padded one cut
    into crops of equal window counts), which round the mean once onto that grid; TFLite's
    AVERAGE_POOL_2D would round it onto its input's scale first."""
    return isinstance(op, (L.GlobalAveragePooling2D, L.AveragePooling2D, L.Concatenate))


def shared_by_quantized(quantized_readers: int) -> bool:
    """A tensor read by several quantized layers is stored once (with an output quantizer)
    and each reader requantizes from it, in Keras as in the int8 model."""
    return quantized_readers >= 2


def producer(tensor):
    """The operation that computes a Keras tensor (None for a graph input)."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def readers(model) -> dict:
    """``{operation name: [reading operations or OUTPUT]}`` over a functional model."""
    out: dict = {}
    for op in model.operations:
        for node in op._inbound_nodes:
            for t in node.input_tensors:
                src = producer(t)
                if src is not None:
                    out.setdefault(src.name, []).append(op)
    for t in model.outputs:
        out.setdefault(producer(t).name, []).append(OUTPUT)
    return out
