"""``flatten()``: one flat functional graph from a model that calls nested models.

``keras.Model(inp, head(backbone(inp)))`` holds the backbone as a single layer; a rewrite
that walks ``model.layers`` (as :func:`metamix_tf.apply` does) would never see the layers
inside it. :func:`flatten` inlines every nested functional or ``Sequential`` model (at any
depth): each leaf layer is rebuilt from its config, called on the flat graph's tensors and
given the original's weights, so the flat model computes exactly what the original does.

Names: a leaf layer keeps its name; where two leaves would share one (two backbones built
from the same constructor), the later one becomes ``<nested model name>_<name>``.
A ``training=`` argument given to a nested model's call (``base(x, training=False)``, the
transfer-learning idiom) is passed on to every layer inside it.
Subclassed models cannot be traversed; they stay one layer (and :func:`metamix_tf.apply`
lists them as float).
"""

from __future__ import annotations

import keras

__all__ = ["flatten", "is_graph_model", "nested_models"]


def is_graph_model(model) -> bool:
    """True for a functional or ``Sequential`` model (a graph of layers one can walk)."""
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and (getattr(model, "_is_graph_network", False)
                                            or type(model).__name__ == "Functional"))


def nested_models(model) -> list:
    """The functional / ``Sequential`` models among ``model.layers`` (not recursive)."""
    return [layer for layer in model.layers if is_graph_model(layer)]


def _leaf_layers(model) -> list:
    """Every non-model layer of ``model``, nested models opened, in graph order."""
    out = []
    for layer in model.layers:
        if is_graph_model(layer):
            out.extend(_leaf_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def flatten(model: keras.Model) -> keras.Model:
    """Returns ``model`` with every nested functional / ``Sequential`` model inlined.

    A model without nested graph models is returned as it is. Otherwise the result is a new
    functional model on new layers with the same configs, names (see the module docstring)
    and weights; the original is not changed.

    Raises:
      ValueError: a nested model is called more than once (its weights are shared between
        the calls, which one flat graph of single-use layers cannot express).
    """
    if not is_graph_model(model):
        raise ValueError("`model` must be a Keras functional or Sequential model. "
                         f"Received: model={type(model).__name__}")
    if not nested_models(model):
        return model
    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    taken = {layer.name for layer in model.layers if not is_graph_model(layer)}
    copies: dict = {}  # id(original leaf) -> its copy in the flat graph
    called: set = set()

    def copy_of(layer, prefix: str):
        if id(layer) not in copies:
            config = layer.get_config()
            if prefix:  # a leaf inside a nested model: keep its name unless it is taken
                name = layer.name if layer.name not in taken else f"{prefix}_{layer.name}"
                if name in taken:
                    raise ValueError(f"Layer name '{name}' occurs twice after flattening; "
                                     f"rename one of them. Received: name={name!r}")
                taken.add(name)
                config["name"] = name
            copies[id(layer)] = layer.__class__.from_config(config)
        return copies[id(layer)]

    def inline(nested, inputs, training):
        if id(nested) in called:
            raise ValueError(
                f"Nested model '{nested.name}' is called more than once; its weights are "
                "shared between the calls, which a flat graph cannot express. Received: "
                f"model={nested.name!r}")
        called.add(id(nested))
        if isinstance(nested, keras.Sequential):
            x = inputs
            for layer in nested.layers:
                x = call(layer, x, prefix=nested.name, training=training)
            return x
        # Functional._run_through_graph is what keras.models.clone_model runs; called
        # directly, its outputs stay connected to ``inputs`` (a Functional built on an
        # intermediate tensor would restart the graph at a copy of it).
        return nested._run_through_graph(
            inputs, operation_fn=lambda layer: layer,
            call_fn=lambda layer, *a, **k: call(layer, *a, prefix=nested.name,
                                                training=training, **k))

    def call(layer, *args, prefix: str = "", training=None, **kwargs):
        if training is not None:
            kwargs["training"] = training
        if is_graph_model(layer):
            if len(args) != 1:
                raise ValueError(f"Nested model '{layer.name}' must be called on one "
                                 f"argument. Received: args={len(args)}")
            return inline(layer, args[0], kwargs.get("training"))
        return copy_of(layer, prefix)(*args, **kwargs)

    flat = keras.models.clone_model(
        model, clone_function=lambda layer: layer,
        call_function=lambda layer, *a, **k: call(layer, *a, **k))
    for original in _leaf_layers(model):
        if original.weights:
            copies[id(original)].set_weights(original.get_weights())
    return flat
