"""Helpers shared by several test modules (imported as ``helpers``: pytest puts this folder
on ``sys.path``)."""

import ast
import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

L = keras.layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def snapshot(directory) -> dict:
    """``{relative path: sha1}`` of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
    return out


def three_conv_model(outputs: int = 1, head_name: str = "fc{i}") -> keras.Model:
    """8x8x3 -> three 3x3 convs (ReLU between) -> pooling -> ``outputs`` Dense(4) heads."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.ReLU()(x)
    x = L.Conv2D(8, 3, padding="same", name="c2")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(8, 3, padding="same", name="c3")(x)
    x = L.GlobalAveragePooling2D()(x)
    heads = [L.Dense(4, name=head_name.format(i=i))(x) for i in range(outputs)]
    return keras.Model(inp, heads[0] if outputs == 1 else heads)


CANDIDATES = (2, 4, 8)


def tiny_net(input_shape=(16, 16, 3), num_classes=4):
    """Convs without bias before BatchNorm, as in the real networks (a bias there has a
    zero gradient in exact arithmetic, so it would only move with float noise)."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv0")(inputs)
    x = keras.layers.BatchNormalization(name="bn0")(x)
    x = keras.layers.ReLU(name="relu0")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 1, use_bias=False, name="pw1")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False,
                            name="conv3")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    x = keras.layers.ReLU(name="relu3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny")


def random_batch(n=16, seed=0, shape=(16, 16, 3), num_classes=4):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(n, *shape)).astype(np.float32)),
            tf.constant(rng.integers(0, num_classes, n).astype(np.int32)))


def package_imports(path: str) -> list[tuple[str, str | None]]:
    """``(module, name)`` of each ``metamix_tf`` import in the Python file ``path``, read with
    ``ast`` (``from a.b import c`` -> ``("a.b", "c")``; ``import a.b`` -> ``("a.b", None)``)."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metamix_tf"):
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names
                    if alias.name.startswith("metamix_tf")]
    return out


def graph_op_types(graph) -> set:
    """The op types of a traced ``graph`` and of the functions in its library."""
    names = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        names.update(node.op for node in function.node_def)
    return names
