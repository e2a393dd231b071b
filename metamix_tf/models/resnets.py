"""The ResNets built here (no ImageNet weights): ResNet-18 and the CIFAR ResNet-20, as flat
functional models returning logits."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from metamix_tf.models.args import check_fraction, check_input_shape, check_num_classes

__all__ = ["resnet18", "resnet20"]


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
    input_shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    dropout = check_fraction("dropout", dropout)
    bn_momentum = check_fraction("bn_momentum", bn_momentum)
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
    input_shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    dropout = check_fraction("dropout", dropout)
    bn_momentum = check_fraction("bn_momentum", bn_momentum)
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
