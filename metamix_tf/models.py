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

import io
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence

import h5py
import keras
import numpy as np
import tensorflow as tf

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


def _check_input_shape(input_shape) -> tuple:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (shape is None or len(shape) != 3
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                       for d in shape)):
        raise ValueError("`input_shape` must be (height, width, channels) with positive integers. "
                         f"Received: input_shape={input_shape!r}")
    return tuple(int(d) for d in shape)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError("`num_classes` must be an integer >= 2. "
                         f"Received: num_classes={num_classes!r}")
    return int(num_classes)


def _check_fraction(arg: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{arg}` must be a float in [0, 1). Received: {arg}={value!r}")
    return float(value)


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
    momentum = _check_fraction("momentum", momentum)
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a Keras model or layer. Received: model={model!r}")
    count = 0
    # `_flatten_layers` walks every tracked sub-layer (nested models, wrappers, custom blocks).
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# ResNet-18
# ---------------------------------------------------------------------------------------------


def _conv_bn(x, filters: int, kernel_size: int, strides: int, prefix: str, suffix: str,
             bn_momentum: float):
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                            use_bias=False, kernel_initializer="he_normal",
                            name=f"{prefix}_conv{suffix}")(x)
    return keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-5,
                                           name=f"{prefix}_bn{suffix}")(x)


def _classifier(inputs, x, num_classes: int, dropout: float, name: str) -> keras.Model:
    """Global average pooling, optional dropout and the ``predictions`` Dense on ``x``."""
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _basic_block(x, filters: int, strides: int, prefix: str, bn_momentum: float):
    shortcut = x
    y = _conv_bn(x, filters, 3, strides, prefix, "1", bn_momentum)
    y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
    y = _conv_bn(y, filters, 3, 1, prefix, "2", bn_momentum)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, f"{prefix}_shortcut", "", bn_momentum)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_relu2")(y)


def resnet18(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             dropout: float = 0.0, bn_momentum: float = 0.9, stem: str = "auto",
             name: str = "resnet18") -> keras.Model:
    """The standard ResNet-18 (He et al., 2016) as a flat functional model returning logits.

    BasicBlocks ``[2, 2, 2, 2]`` at widths 64-128-256-512, strides 1-2-2-2 on the first conv of
    each stage, 1x1 conv + BN projection shortcuts where the shape changes (3 of them), ReLU
    after the residual add; global average pooling, optional dropout, Dense ``"predictions"``.
    Every conv is ``Conv2D(use_bias=False)`` + ``BatchNormalization`` with its own ``ReLU``
    layer: 20 Conv2D and 1 Dense in all. Layers are named ``stem_conv``,
    ``stage{1-4}_block{1,2}_{conv1,bn1,relu1,conv2,bn2,shortcut_conv,shortcut_bn,add,relu2}``.

    ``stem="auto"`` picks the CIFAR stem (3x3 conv, stride 1, no pooling) when both input sides
    are <= 64, else the ImageNet stem (7x7 conv, stride 2, then 3x3 max-pool stride 2);
    ``"cifar"`` / ``"imagenet"`` force one. ``bn_momentum=0.9`` and ``epsilon=1e-5`` match
    PyTorch's defaults (its momentum=0.1). Padding is TensorFlow ``"same"`` (stride-2 layers
    pad bottom/right), so torchvision weights do not port bit-exactly.
    """
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    dropout = _check_fraction("dropout", dropout)
    bn_momentum = _check_fraction("bn_momentum", bn_momentum)
    if stem == "auto":
        stem = "cifar" if max(input_shape[:2]) <= 64 else "imagenet"
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"`stem` must be 'auto', 'cifar' or 'imagenet'. Received: stem={stem!r}")

    inputs = keras.Input(shape=input_shape, name="input")
    if stem == "cifar":
        x = _conv_bn(inputs, 64, 3, 1, "stem", "", bn_momentum)
        x = keras.layers.ReLU(name="stem_relu")(x)
    else:
        x = _conv_bn(inputs, 64, 7, 2, "stem", "", bn_momentum)
        x = keras.layers.ReLU(name="stem_relu")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (filters, strides) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for block in (1, 2):
            x = _basic_block(x, filters, strides if block == 1 else 1,
                             f"stage{stage}_block{block}", bn_momentum)
    return _classifier(inputs, x, num_classes, dropout, name)


# ---------------------------------------------------------------------------------------------
# ResNet-20 (CIFAR)
# ---------------------------------------------------------------------------------------------


def resnet20(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             dropout: float = 0.0, bn_momentum: float = 0.9,
             name: str = "resnet20") -> keras.Model:
    """The CIFAR ResNet-20 (He et al., 2016, section 4.2) as a flat functional model returning
    logits.

    A 3x3 conv (16 filters, stride 1), then 3 stages of 3 BasicBlocks at widths 16-32-64,
    strides 1-2-2 on the first conv of each stage, global average pooling, optional dropout,
    Dense ``"predictions"``. Where the shape changes (2 places) the shortcut is a 1x1 conv + BN
    projection (the paper's option B; its CIFAR nets use option A, zero-padded identity, which
    has no conv to quantize): 21 Conv2D and 1 Dense, 272,474 trainable parameters at 10
    classes (option A: 270K). Layer names and BN settings as in :func:`resnet18`
    (``stage{1-3}_block{1-3}_...``).
    """
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    dropout = _check_fraction("dropout", dropout)
    bn_momentum = _check_fraction("bn_momentum", bn_momentum)
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv_bn(inputs, 16, 3, 1, "stem", "", bn_momentum)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, (filters, strides) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        for block in (1, 2, 3):
            x = _basic_block(x, filters, strides if block == 1 else 1,
                             f"stage{stage}_block{block}", bn_momentum)
    return _classifier(inputs, x, num_classes, dropout, name)


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


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


def _h5_arrays(h5file) -> dict:
    """``{path: shape}`` of the layer variables stored in a Keras 3 weights file."""
    arrays = {}

    def visit(path, obj):
        if isinstance(obj, h5py.Dataset) and path.startswith("layers/"):
            arrays[path] = tuple(obj.shape)

    if "layers" in h5file:
        h5file["layers"].visititems(lambda p, o: visit(f"layers/{p}", o))
    return arrays


def _file_arrays(path: str) -> dict:
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            data = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(data, "r") as f:
            return _h5_arrays(f)
    with h5py.File(path, "r") as f:
        return _h5_arrays(f)


def _model_arrays(model: keras.Model) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.weights.h5")
        model.save_weights(path)
        return _file_arrays(path)


def _check_weights_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Weights file not found. Received: weights={path!r}")
    if not (path.endswith(".keras") or path.endswith(".weights.h5")):
        raise ValueError("`weights` must be None, 'imagenet', or a path ending in '.keras' or "
                         f"'.weights.h5'. Received: weights={path!r}")


def _describe_mismatch(stored: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(stored))
    unused = sorted(set(stored) - set(expected))
    reshaped = sorted(p for p in set(expected) & set(stored) if expected[p] != stored[p])
    parts = []
    if missing:
        parts.append(f"{len(missing)} array(s) missing from the file, e.g. {missing[0]}")
    if unused:
        parts.append(f"{len(unused)} array(s) the model does not have, e.g. {unused[0]}")
    if reshaped:
        p = reshaped[0]
        parts.append(f"{len(reshaped)} shape mismatch(es), e.g. {p}: "
                     f"file {stored[p]} vs model {expected[p]}")
    return "; ".join(parts)


def _load_weights_file(model: keras.Model, path: str) -> None:
    """Loads a ``.keras`` / ``.weights.h5`` file into ``model``; ValueError when it does not fit.

    Keras alone ignores arrays a file has beyond the model's, so the stored layout is first
    compared with the layout ``model`` itself saves.
    """
    _check_weights_path(path)
    try:
        stored = _file_arrays(path)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"Could not read weights from {path} ({e}). Received: weights={path!r}") \
            from None
    expected = _model_arrays(model)
    if stored and stored != expected:  # empty for files in pre-Keras-3 layouts: Keras decides
        raise ValueError(f"The weights in {path} do not fit model '{model.name}': "
                         f"{_describe_mismatch(stored, expected)}. Received: weights={path!r}")
    try:
        model.load_weights(path)
    except ValueError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"The weights in {path} do not fit model '{model.name}': {first} "
                         f"Received: weights={path!r}") from e


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
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    bn_momentum = _check_fraction("bn_momentum", bn_momentum, allow_none=True)
    dropout = _check_fraction("dropout", dropout)
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
        _check_weights_path(weights)  # fail before building

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
        _load_weights_file(model, weights)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model
