"""The float networks that ``metamix_tf`` quantizes, built as flat Keras 3 functional models.

:func:`build` is the one entry point: a name from :data:`MODEL_NAMES`, an input shape and a
class count give a functional model whose every ``Conv2D`` / ``DepthwiseConv2D`` / ``Dense`` is
a direct layer of the model (no nested sub-models), returning logits (no softmax). The
architecture depends only on ``(name, input_shape, num_classes)``, never on ``weights``, so a
``.weights.h5`` saved from any built model loads back with ``build(..., weights=path)``.

Input convention: feed ``preprocess_input(name)(images)`` with float32 ``images`` in
``[0, 255]``; no model rescales its input inside itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.models.args import check_fraction, check_input_shape, check_num_classes
from metamix_tf.models.resnets import resnet18, resnet20
from metamix_tf.models.weights_file import check_weights_path, load_weights_file

__all__ = [
    "MODEL_NAMES",
    "build",
    "preprocess_input",
    "resnet18",
    "resnet20",
    "set_bn_momentum",
]

MODEL_NAMES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet20",
               "resnet50")
_OWN = ("resnet18", "resnet20")  # built here, no ImageNet weights

# Looked up at call time so tests can stand in for the ImageNet download.
_KERAS_APPS = {
    "mobilenet_v2": keras.applications.MobileNetV2,
    "mobilenet_v3_small": keras.applications.MobileNetV3Small,
    "mobilenet_v3_large": keras.applications.MobileNetV3Large,
    "resnet50": keras.applications.ResNet50,
}
_MOBILENET_V3 = ("mobilenet_v3_small", "mobilenet_v3_large")
# The layer that maps features to classes: a Dense for MobileNetV2 / ResNet50 and our ResNets,
# a 1x1 Conv2D (followed by Flatten and a linear Activation named "predictions") in MobileNetV3.
_CLASSIFIER = {"mobilenet_v3_small": "logits", "mobilenet_v3_large": "logits"}
_KERAS_MIN_SIDE = 32  # keras.applications refuse smaller inputs
_IMAGENET_CLASSES = 1000
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"Unknown model name; expected one of {MODEL_NAMES}. "
                         f"Received: name={name!r}")
    return name


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _as_float32(x):
    if tf.is_tensor(x) or isinstance(x, keras.KerasTensor):
        return keras.ops.cast(x, "float32")
    return np.array(x, dtype=np.float32, copy=True)  # a copy: callers' arrays stay untouched


def _scale_to_symmetric_unit(x):
    """Maps ``[0, 255]`` to ``[-1, 1]``: ``x / 127.5 - 1``."""
    return _as_float32(x) / 127.5 - 1.0


def _caffe(x):
    """Keras' caffe-style ResNet preprocessing: RGB to BGR, minus the ImageNet BGR mean.

    3 channels use ``keras.applications.resnet.preprocess_input``; 1 channel (grayscale)
    subtracts the mean of the three channel means, keeping the same scale.
    """
    x = _as_float32(x)
    channels = x.shape[-1]
    if channels == 1:
        return x - float(np.mean(_CAFFE_BGR_MEAN))
    if channels not in (3, None):
        raise ValueError("ResNet50 preprocessing takes 1 or 3 channels. "
                         f"Received: channels={channels}")
    return keras.applications.resnet.preprocess_input(x)


def preprocess_input(name: str) -> Callable:
    """The function that maps float32 images in ``[0, 255]`` to what model ``name`` expects.

    ``resnet50``: Keras' caffe style (RGB to BGR, minus the ImageNet mean, no scaling), the
    convention of its ImageNet weights. Every other model: ``x / 127.5 - 1`` into ``[-1, 1]``
    (MobileNetV3 is built with ``include_preprocessing=False``, so this replaces its internal
    Rescaling layer). The function takes NumPy arrays (returning a new float32 array) or
    tensors, so it can run in a ``tf.data`` map.
    """
    if _check_name(name) == "resnet50":
        return _caffe
    return _scale_to_symmetric_unit


# ---------------------------------------------------------------------------------------------
# BatchNorm momentum
# ---------------------------------------------------------------------------------------------


def set_bn_momentum(model, momentum: float) -> int:
    """Sets ``momentum`` on every ``BatchNormalization`` layer of ``model``, nested ones included.

    Changes the layers in place and returns how many were set. Call it before ``compile`` /
    ``fit`` (an already traced train function keeps the old value until it is rebuilt).
    """
    momentum = check_fraction("momentum", momentum)
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a Keras model or layer. Received: model={model!r}")
    count = 0
    # `_flatten_layers` walks every tracked sub-layer (nested models, wrappers, custom blocks).
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
    return count


def _keras_app_kwargs(name: str, dropout: float) -> dict:
    if name in _MOBILENET_V3:
        kwargs = {"include_preprocessing": False, "minimalistic": False}
        if dropout > 0:  # 0 keeps Keras' default dropout_rate=0.2 before the logits conv
            kwargs["dropout_rate"] = dropout
        return kwargs
    return {}


def _keras_app(name: str, input_shape: tuple, num_classes: int, dropout: float) -> keras.Model:
    """The architecture of a keras.applications model with random weights and a logits head."""
    ctor = _KERAS_APPS[name]
    kwargs = _keras_app_kwargs(name, dropout)
    if name in _MOBILENET_V3:
        # Keras' own head: GAP, 1x1 conv_2 + hard-swish, dropout, 1x1 conv "logits", Flatten.
        return ctor(input_shape=input_shape, include_top=True, weights=None,
                    classes=num_classes, classifier_activation=None, name=name, **kwargs)
    # Same variables as Keras' include_top=True head (GAP + Dense "predictions"), plus dropout.
    base = ctor(input_shape=input_shape, include_top=False, weights=None, pooling="avg", **kwargs)
    x = base.output
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(base.input, outputs, name=name)


def _load_imagenet(model: keras.Model, name: str, num_classes: int, dropout: float) -> None:
    """Copies Keras' ImageNet weights into ``model`` layer by layer (by name).

    Downloads through ``keras.applications`` (the full include_top file at 224x224); conv and
    BN weights do not depend on the input size. The classifier is copied only when
    ``num_classes == 1000``; otherwise it keeps its random initialisation.
    """
    reference = _KERAS_APPS[name](input_shape=(224, 224, 3), include_top=True, weights="imagenet",
                                  classes=_IMAGENET_CLASSES, **_keras_app_kwargs(name, dropout))
    source = {layer.name: layer for layer in reference.layers if layer.weights}
    classifier = _CLASSIFIER.get(name, "predictions")
    for layer in model.layers:
        if not layer.weights:
            continue
        src = source.get(layer.name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if src is not None and [tuple(w.shape) for w in src.weights] == shapes:
            layer.set_weights(src.get_weights())
        elif not (layer.name == classifier and num_classes != _IMAGENET_CLASSES):
            raise ValueError(f"Keras' ImageNet weights for {name} have no layer that fits "
                             f"'{layer.name}'. Received: name={name!r}")


def build(name: str, input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
          weights: str | None = None, bn_momentum: float | None = None,
          dropout: float = 0.0) -> keras.Model:
    """A flat functional model ``name`` (one of :data:`MODEL_NAMES`) returning logits.

    Args:
        name: ``"mobilenet_v2"``, ``"mobilenet_v3_small"``, ``"mobilenet_v3_large"``
            (``keras.applications``, MobileNetV3 non-minimalistic without its internal
            Rescaling), ``"resnet18"`` (:func:`resnet18`), ``"resnet20"`` (:func:`resnet20`,
            CIFAR) or ``"resnet50"``.
        input_shape: ``(height, width, channels)``; ``keras.applications`` models need
            height and width >= 32 (at 32x32 their last feature map is 1x1).
        num_classes: size of the logits, >= 2.
        weights: ``None`` (random), ``"imagenet"`` (Keras' weights, downloaded by
            ``keras.applications``; needs 3 channels; not for the ResNet-18/20; the classifier
            is kept only when ``num_classes == 1000``), or the path of a ``.keras`` /
            ``.weights.h5`` file saved from a model built with the same arguments.
        bn_momentum: when not ``None``, the momentum of every BatchNormalization layer
            (Keras applications use 0.999 / 0.99, too slow for short runs; 0.9 works).
        dropout: rate of a Dropout before the classifier. 0 keeps each model's default:
            none, except MobileNetV3's built-in ``dropout_rate=0.2``.

    The layers are the same for every ``weights`` value. MobileNetV2, ResNet50 and ResNet-18/20
    end in a Dense named ``"predictions"``; MobileNetV3 keeps Keras' head, a 1x1 Conv2D
    ``"logits"`` on the pooled 1x1 map, then Flatten and a linear Activation ``"predictions"``.
    The ``"imagenet"`` path cannot be exercised offline.
    """
    name = _check_name(name)
    input_shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    bn_momentum = check_fraction("bn_momentum", bn_momentum, allow_none=True)
    dropout = check_fraction("dropout", dropout)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError("`weights` must be None, 'imagenet', or a path to a '.keras' or "
                         f"'.weights.h5' file. Received: weights={weights!r}")
    weights = None if weights is None else os.fspath(weights)
    if weights == "imagenet":
        if name in _OWN:
            raise ValueError(f"There are no ImageNet weights for {name}; use weights=None or a "
                             f"file path. Received: weights={weights!r}")
        if input_shape[-1] != 3:
            raise ValueError("ImageNet weights need 3 input channels. "
                             f"Received: input_shape={input_shape}")
    elif weights is not None:
        check_weights_path(weights)  # fail before building

    if name == "resnet18":
        model = resnet18(input_shape, num_classes, dropout=dropout, name=name)
    elif name == "resnet20":
        model = resnet20(input_shape, num_classes, dropout=dropout, name=name)
    else:
        if min(input_shape[:2]) < _KERAS_MIN_SIDE:
            raise ValueError(f"{name} needs input height and width >= {_KERAS_MIN_SIDE}. "
                             f"Received: input_shape={input_shape}")
        model = _keras_app(name, input_shape, num_classes, dropout)

    if weights == "imagenet":
        _load_imagenet(model, name, num_classes, dropout)
    elif weights is not None:
        load_weights_file(model, weights)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model
