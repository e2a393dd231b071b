"""The float model in the form :func:`metamix_tf.apply` quantizes: same function, layers an
int8 model runs one op each.

* ``SeparableConv2D`` -> ``DepthwiseConv2D`` (``<name>_depthwise``, no bias) then a 1x1
  ``Conv2D`` (``<name>``, the bias and activation): both get quantizers, both are searched,
  and the tensor between them is the one the int8 model stores anyway.
* A conv / dense with an activation TFLite does not fuse (sigmoid, swish, ...) -> the layer
  with a linear activation, then ``Activation`` (``<name>_activation``): the int8 model
  stores the pre-activation tensor, so the Keras model gets a quantizer there.
* Hard-swish ``Activation`` -> ``x * (relu6(x + 3) * (1 / 6))`` (``ReLU`` ``<name>_relu6``,
  ``Multiply`` ``<name>``): TFLite's int8 HARD_SWISH rounds its fixed-point approximation,
  one step off now and then; ADD + RELU6, MUL by a constant and MUL round exactly what the
  Keras model's quantizers round.
* Swish / SiLU ``Activation`` -> ``x * sigmoid(x)``, and every sigmoid output rounded by
  :class:`SigmoidGrid` onto the grid TFLite's int8 LOGISTIC stores (scale 1/256): the
  int8 model stores the sigmoid, so the Keras model rounds it there too.
* Inception-ResNet's ``CustomScaleLayer`` (``a + scale * b``) -> ``Add``, the scale folded
  into the linear conv that computes ``b``; ConvNeXt's ``LayerScale`` (``x * gamma``, per
  channel) -> nothing, ``gamma`` folded into the linear conv / dense that computes ``x``.
* Several identical weightless activations of one tensor (NASNet's ``relu`` of a cell
  input, once per branch) -> one: the TFLite converter merges them into one op whose output
  no single int8 grid fits (it stays float); as one layer read by several quantized layers
  it gets its own output quantizer in :func:`metamix_tf.apply`.
* A ``Conv2D`` with one group per channel (``groups == filters == input channels``,
  ConvNeXt's 7x7 convs) -> ``DepthwiseConv2D`` (the same kernel, reshaped).

Weights are copied; a model that needs none of this is returned as is.
"""

from __future__ import annotations

import keras
import numpy as np
from keras.src.ops import numpy as knp  # named op nodes (keras.ops takes no name)

from metamix_tf.quant import graph_rules as rules

__all__ = ["canonicalize", "needs_rewrite", "SigmoidGrid"]

L = keras.layers
_KEEP_ACTIVATIONS = (None, "linear") + rules.FUSABLE_ACTIVATIONS


def _is_custom_scale(layer) -> bool:
    return type(layer).__name__ == "CustomScaleLayer" and hasattr(layer, "scale")


def _is_layer_scale(layer) -> bool:
    return type(layer).__name__ == "LayerScale" and hasattr(layer, "gamma")


def _is_channelwise_conv(layer) -> bool:
    """A grouped ``Conv2D`` with one input and one output channel per group: a depthwise
    conv."""
    return (type(layer) is L.Conv2D and layer.groups > 1 and layer.groups == layer.filters
            and int(layer.input.shape[-1]) == layer.groups)


def _activation_key(layer, inputs) -> tuple | None:
    """What makes two activation layers on one tensor the same computation (None for any
    other layer)."""
    if not isinstance(layer, (L.Activation, L.ReLU)) or isinstance(inputs, (list, tuple)):
        return None
    config = {k: v for k, v in layer.get_config().items() if k not in ("name", "trainable")}
    return id(inputs), type(layer).__name__, repr(sorted(config.items()))


def _duplicate_activations(model) -> bool:
    seen = set()
    for op in model.operations:
        for node in op._inbound_nodes:
            tensors = node.input_tensors
            key = _activation_key(op, tensors[0]) if len(tensors) == 1 else None
            if key is not None and key in seen:
                return True
            seen.add(key)
    return False


def _depthwise_config(config: dict) -> dict:
    keep = ("name", "kernel_size", "strides", "padding", "data_format", "dilation_rate",
            "activation", "use_bias", "trainable", "dtype")
    return {**{k: config[k] for k in keep if k in config}, "depth_multiplier": 1}


def _splits_activation(layer) -> bool:
    return (type(layer) in (L.Conv2D, L.DepthwiseConv2D, L.Dense, L.SeparableConv2D)
            and rules.activation_name(layer) not in _KEEP_ACTIVATIONS)


@keras.saving.register_keras_serializable(package="metamix_tf")
class SigmoidGrid(keras.layers.Layer):
    """Rounds a sigmoid output onto ``q / 256``, ``q`` in ``[0, 255]`` (TFLite's fixed int8
    LOGISTIC output grid), with a straight-through gradient, while ``enabled`` (a Python
    attribute that :func:`metamix_tf.set_mode` and friends set with the quantizers' modes:
    off in ``"float"`` and ``"calibrate"``, so a float-mode model computes the original)."""

    selected_bits, signed, selected_step = 8, False, 1.0 / 256.0  # read by the export
    enabled = False

    def call(self, inputs):
        if not self.enabled:
            return inputs
        q = keras.ops.clip(keras.ops.round(inputs * 256.0), 0.0, 255.0) / 256.0
        return inputs + keras.ops.stop_gradient(q - inputs)


def _is_sigmoid(layer) -> bool:
    return isinstance(layer, L.Activation) and rules.activation_name(layer) == "sigmoid"


def _is_swish(layer) -> bool:
    return isinstance(layer, L.Activation) and rules.activation_name(layer) in ("silu", "swish")


def is_hard_swish_product(op) -> bool:
    """Whether ``op`` is the ``Multiply`` that :func:`canonicalize` writes for a hard-swish
    (one of its inputs comes, through ``/ 6``, from the ``ReLU`` named ``<name>_relu6``)."""
    if not isinstance(op, L.Multiply):
        return False
    frontier = [rules.producer(t) for t in op.input]
    for _ in range(2):  # the divide, then the relu6
        if any(getattr(p, "name", None) == f"{op.name}_relu6" for p in frontier):
            return True
        frontier = [rules.producer(t) for p in frontier if p is not None
                    for t in (p.input if isinstance(p.input, (list, tuple)) else [p.input])
                    if hasattr(t, "_keras_history")]
    return False


def _is_hard_swish(layer) -> bool:
    return isinstance(layer, L.Activation) and rules.activation_name(layer) in rules.HARD_SWISH


def needs_rewrite(model) -> bool:
    """Whether :func:`canonicalize` changes ``model``."""
    return any(isinstance(op, L.SeparableConv2D) or _splits_activation(op)
               or _is_custom_scale(op) or _is_hard_swish(op) or _is_swish(op)
               or _is_layer_scale(op) or _is_channelwise_conv(op)
               for op in model.operations) or bool(_ungridded_sigmoids(model)) or \
        _duplicate_activations(model)


def _ungridded_sigmoids(model) -> set:
    """Sigmoid activations not yet followed by a :class:`SigmoidGrid` alone."""
    readers = rules.readers(model)
    return {op.name for op in model.operations if _is_sigmoid(op) and not (
        len(readers.get(op.name, [])) == 1
        and isinstance(readers[op.name][0], SigmoidGrid))}


def _swish(name: str, x):
    gate = L.Activation("sigmoid", name=f"{name}_sigmoid")(x)
    gate = SigmoidGrid(name=f"{name}_sigmoid_grid")(gate)
    return L.Multiply(name=name)([x, gate])


def _scaled_sources(model) -> dict:
    """``{layer name: scale}``: the linear convs / dense layers whose only reader is a
    CustomScaleLayer (as its scaled input) or a LayerScale, with the scale (a float, or
    one per channel) to fold into them; raises for any other."""
    readers = rules.readers(model)
    out = {}
    for op in model.operations:
        if _is_custom_scale(op):
            scaled = rules.producer(op._inbound_nodes[0].input_tensors[1])
            scale = np.float32(op.scale)
        elif _is_layer_scale(op):
            scaled = rules.producer(op._inbound_nodes[0].input_tensors[0])
            scale = keras.ops.convert_to_numpy(op.gamma).astype(np.float32)
        else:
            continue
        if not (type(scaled) in (L.Conv2D, L.Dense)
                and rules.activation_name(scaled) in (None, "linear")
                and len(readers.get(scaled.name, [])) == 1):
            raise ValueError(
                f"Layer '{op.name}' ({type(op).__name__}) scales a tensor that is not the "
                "output of a linear Conv2D / Dense read by it alone; the scale cannot be "
                f"folded. Received: layer={op.name!r}")
        out[scaled.name] = scale
    return out


def canonicalize(model: keras.Model) -> keras.Model:
    """A functional copy of ``model`` rewritten as the module docstring says (or ``model``
    itself when nothing needs rewriting)."""
    if not needs_rewrite(model):
        return model
    scaled = _scaled_sources(model)
    ungridded = _ungridded_sigmoids(model)
    rewritten: set = set()

    def clone(layer):
        config = layer.get_config()
        if _splits_activation(layer) and not isinstance(layer, L.SeparableConv2D):
            config = dict(config, activation="linear")
        if _is_channelwise_conv(layer):
            return L.DepthwiseConv2D.from_config(_depthwise_config(config))
        return layer.__class__.from_config(config)

    merged: dict = {}  # activation key -> its first output

    def call(layer, *args, **kwargs):
        name = layer.name
        original = operations[name]
        key = _activation_key(original, args[0]) if args and not kwargs else None
        if key is not None and not _splits_activation(original):
            if key not in merged:
                merged[key] = _call(layer, original, args, kwargs)
            return merged[key]
        return _call(layer, original, args, kwargs)

    def _call(layer, original, args, kwargs):
        name = layer.name
        if isinstance(original, L.SeparableConv2D):
            rewritten.add(name)
            return _separable(original, args[0])
        if _is_custom_scale(original):
            a, b = args[0]
            return L.Add(name=name)([a, b])
        if _is_layer_scale(original):
            return args[0]
        if _is_swish(original):
            return _swish(name, args[0])
        if _is_hard_swish(original):
            x = args[0]
            # keras' hard_silu: x * (relu6(x + 3) / 6), the same float operations; the ops are
            # named after the layer (keras.ops.add would take the next free "add", which a
            # loaded model may already use: "The name 'add' is used 2 times")
            plus3 = knp.Add(name=f"{name}_plus3")(x, 3.0)
            gate = L.ReLU(6.0, name=f"{name}_relu6")(plus3)
            return L.Multiply(name=name)([x, knp.Divide(name=f"{name}_div6")(gate, 6.0)])
        out = layer(*args, **kwargs)
        if _splits_activation(original):
            act = L.Activation(original.activation, name=f"{name}_activation")
            if _is_swish(act):
                return _swish(act.name, out)
            out = act(out)
            if _is_sigmoid(act):
                out = SigmoidGrid(name=f"{name}_activation_grid")(out)
        elif name in ungridded:
            out = SigmoidGrid(name=f"{name}_grid")(out)
        return out

    operations = {op.name: op for op in model.operations}
    new = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for old in model.layers:
        if old.name in rewritten or not old.weights:
            continue
        if _is_layer_scale(old):
            continue  # folded into its source
        weights = old.get_weights()
        if old.name in scaled:  # fold the scale (one, or per output channel) into the layer
            weights = [w * scaled[old.name] for w in weights]
        if _is_channelwise_conv(old):  # (kh, kw, 1, C) -> (kh, kw, C, 1)
            weights = [np.transpose(weights[0], (0, 1, 3, 2))] + weights[1:]
        new.get_layer(old.name).set_weights(weights)
    return new


def _numpy(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable)


def _separable(layer, x):
    """``SeparableConv2D`` ``layer`` applied to ``x`` as a depthwise then a pointwise conv,
    with its weights."""
    config = layer.get_config()
    depthwise = L.DepthwiseConv2D(
        kernel_size=config["kernel_size"], strides=config["strides"],
        padding=config["padding"], depth_multiplier=config["depth_multiplier"],
        data_format=config["data_format"], dilation_rate=config["dilation_rate"],
        use_bias=False, name=f"{layer.name}_depthwise")
    pointwise = L.Conv2D(config["filters"], 1, use_bias=config["use_bias"],
                         data_format=config["data_format"], name=layer.name)
    y = pointwise(depthwise(x))
    depthwise.set_weights([_numpy(layer.depthwise_kernel)])
    pointwise.set_weights([_numpy(layer.pointwise_kernel)]
                          + ([_numpy(layer.bias)] if config["use_bias"] else []))
    if rules.activation_name(layer) not in (None, "linear"):
        act = L.Activation(layer.activation, name=f"{layer.name}_activation")
        y = act(y)
    return y
