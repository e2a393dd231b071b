"""Reads a wrapped Keras model into the simplified graph the export plans on.

Identities are removed, a BatchNorm that folds is merged into the quantized layer before it,
each output quantizer is attached to the node that computes its tensor, and every other
operation becomes a node of one kind:

* ``"input"``: a model input;
* ``"prefix"``: input preprocessing (``Rescaling``, ``Normalization``) between the input and
  the first quantizer, run in float ahead of the int8 model's input quantization;
* ``"quant"``: a quantized conv / depthwise conv / dense (BatchNorm folded);
* ``"affine"``: a BatchNormalization that does not fold (pre-activation, after a
  concatenation), run as an int8 1x1 depthwise conv with 8-bit per-channel weights;
* ``"pass"``: a shape-only layer (zero padding, cropping, max pooling, reshape);
* ``"op"``: a weightless int8 op (add, multiply, concatenation, pooling, activation, or a
  ``keras.ops`` call with a constant);
* ``"island"``: a float island (:data:`graph_rules.FLOAT_ISLANDS`: LayerNormalization, GELU),
  run in float between int8 tensors.

Which layer is which comes from :mod:`metamix_tf.quant.graph_rules`, the table ``apply()`` uses.
"""

from __future__ import annotations

import dataclasses

import keras

from metamix_tf.quant import graph_rules as rules
from metamix_tf.quant.canonical import SigmoidGrid
from metamix_tf.quant.layers import QuantLayerMixin
from metamix_tf.quant.quantizers import ActivationQuantizer

__all__ = ["UnsupportedModelError", "OUTPUT", "Node", "read_graph", "node_readers",
           "effective_readers", "stored", "unsupported"]

OUTPUT = "<output>"
L = keras.layers
_PREPROCESSING = (L.Rescaling, L.Normalization)


class UnsupportedModelError(ValueError):
    """The model has a layer or a setting that the int8 export cannot reproduce."""


@dataclasses.dataclass
class Node:
    name: str
    layer: object  # a Keras layer or keras.ops operation
    kind: str  # "input" | "prefix" | "quant" | "affine" | "pass" | "op" | "island"
    inputs: list
    bn: keras.layers.BatchNormalization | None = None
    output_quantizer: ActivationQuantizer | None = None
    keras_output: object = None  # the reference model's tensor this node computes
    keras_node: object = None  # the Keras node (its call arguments, for rebuilding)


def unsupported(layer, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Layer '{layer.name}' ({type(layer).__name__}) cannot be exported to int8 TFLite: "
        f"{why} Received: layer={layer.name!r}")


def _producer(tensor) -> str:
    return tensor._keras_history.operation.name


def _keras_nodes(model) -> list:
    """The model's Keras nodes in topological order; raises on shared layers."""
    by_depth = model._nodes_by_depth
    ordered = [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]
    seen = set()
    for node in ordered:
        name = node.operation.name
        if name in seen:
            raise unsupported(node.operation, "it is called more than once (a shared layer); "
                              "give each call its own layer.")
        seen.add(name)
    return ordered


def _check_quant_layer(layer) -> None:
    if layer.input_quantizer is None or layer.kernel_quantizer is None:
        raise unsupported(layer, "it has no input or no kernel quantizer; wrap the float "
                          "model with metamix_tf.apply.")
    if not layer.kernel_quantizer.enabled:
        raise unsupported(layer, "its weight quantizer is off; export the model after weight "
                          "training (final.keras), or call "
                          "metamix_tf.enable_weight_quantization first.")


def _check_op(layer) -> None:
    name = rules.activation_name(layer)
    if isinstance(layer, (L.Activation, L.ReLU)) and name not in rules.INT8_ACTIVATIONS:
        raise unsupported(layer, f"activation {name!r} has no int8 TFLite kernel here "
                          f"(supported: {', '.join(rules.INT8_ACTIVATIONS)}).")


def _weighted(layer) -> bool:
    return bool(getattr(layer, "weights", None))


def read_graph(model) -> tuple[list, list]:
    """``(nodes, outputs)``: the simplified graph (module docstring), topologically ordered,
    and the names of the nodes that compute the model outputs."""
    keras_nodes = _keras_nodes(model)
    readers: dict = {}
    for node in keras_nodes:
        for t in node.input_tensors:
            readers.setdefault(_producer(t), []).append(node.operation.name)
    for t in model.outputs:
        readers.setdefault(_producer(t), []).append(OUTPUT)

    alias: dict = {}
    nodes: dict = {}
    for node in keras_nodes:
        layer = node.operation
        inputs = [alias.get(_producer(t), _producer(t)) for t in node.input_tensors]
        if len(node.output_tensors) != 1:
            raise unsupported(layer, "it has several outputs; split it into layers with one "
                              "output each.")
        output = node.output_tensors[0]
        sources = [nodes[i] for i in inputs if i in nodes]
        kind = None
        if isinstance(layer, L.InputLayer):
            kind = "input"
        elif isinstance(layer, _PREPROCESSING):
            if not sources or sources[0].kind not in ("input", "prefix"):
                raise unsupported(layer, "input preprocessing runs only right after the model "
                                  "input (before any quantizer); move it to the data "
                                  "pipeline.")
            kind = "prefix"
        elif isinstance(layer, QuantLayerMixin):
            _check_quant_layer(layer)
            kind = "quant"
        elif isinstance(layer, L.BatchNormalization):
            if layer.axis not in (-1, len(output.shape) - 1):
                raise unsupported(layer, "only channels-last BatchNormalization exports.")
            producer = nodes.get(inputs[0])
            if (producer is not None and producer.kind == "quant" and producer.bn is None
                    and producer.output_quantizer is None
                    and rules.folds_batch_norm(layer, producer.layer,
                                               len(readers.get(producer.name, [])))):
                producer.bn = layer
                producer.keras_output = output
                alias[layer.name] = producer.name
            elif len(output.shape) != 4:
                raise unsupported(layer, "a BatchNormalization that does not fold into the "
                                  "conv before it exports on 4-D (image) tensors only.")
            else:
                kind = "affine"
        elif isinstance(layer, (ActivationQuantizer, SigmoidGrid)):
            producer = nodes.get(inputs[0])
            if producer is None or producer.kind in ("pass", "input", "prefix") \
                    or producer.output_quantizer:
                raise unsupported(layer, "an output quantizer must directly follow the layer "
                                  "that computes its tensor (as metamix_tf.apply puts it).")
            producer.output_quantizer = layer
            alias[layer.name] = producer.name
        elif rules.is_identity(layer):
            alias[layer.name] = inputs[0]
        elif rules.is_float_island(layer):
            kind = "island"
        elif rules.is_shape_only(layer):
            kind = "pass"
        elif rules.is_float_op(layer):
            _check_op(layer)
            kind = "op"
        elif _weighted(layer):
            raise unsupported(layer, "it has weights but no quantizers (every weighted layer "
                              "must be a quantized Conv2D / DepthwiseConv2D / Dense; do not "
                              "exclude it in quant.exclude; metamix_tf.apply splits "
                              "SeparableConv2D into quantized depthwise + pointwise convs).")
        else:
            raise unsupported(layer, "no int8 export rule for this layer type; replace it with "
                              "layers of metamix_tf.quant.graph_rules, or export float16 / float32 "
                              "only (--format=float16,float32).")
        if kind is not None:
            nodes[layer.name] = Node(layer.name, layer, kind, inputs, keras_output=output,
                                     keras_node=node)
    outputs = [alias.get(_producer(t), _producer(t)) for t in model.outputs]
    return list(nodes.values()), outputs


def node_readers(nodes: list, outputs: list) -> dict:
    readers = {n.name: [] for n in nodes}
    for n in nodes:
        for i in n.inputs:
            readers[i].append(n.name)
    for o in outputs:
        readers[o].append(OUTPUT)
    return readers


def effective_readers(name: str, readers: dict, by_name: dict) -> list:
    """Readers of ``name``, looking through pass-through layers (unique, in order)."""
    out = []
    for r in readers[name]:
        if r != OUTPUT and by_name[r].kind == "pass":
            out.extend(effective_readers(r, readers, by_name))
        else:
            out.append(r)
    return list(dict.fromkeys(out))


def stored(node: Node, readers: dict, by_name: dict) -> bool:
    """Whether the int8 model stores this tensor (:func:`graph_rules.stores`); a
    preprocessing node stores only the last one, which the input quantization reads."""
    if node.kind == "pass":
        return False
    mine = readers[node.name]
    if node.kind in ("input", "prefix"):
        return any(r == OUTPUT or by_name[r].kind != "prefix" for r in mine)
    if len(mine) == 1 and mine[0] != OUTPUT:
        reader = by_name[mine[0]].layer
        if rules.is_fusable_activation(reader) and rules.fuses_activation(node.layer):
            return False
    return True
