"""Helpers shared by several test modules (imported as ``helpers``: pytest puts this folder
on ``sys.path``)."""

import hashlib
import os

import keras

L = keras.layers


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
