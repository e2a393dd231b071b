"""Tests for metamix_tf.models: architectures, weights files, BN momentum, preprocessing."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.models.functional import Functional

from metamix_tf import models

COMPUTE_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


@functools.cache
def _built(name):
    """One 32x32x3, 10-class model per name with bn_momentum=0.9; tests must not mutate it."""
    return models.build(name, input_shape=(32, 32, 3), num_classes=10, bn_momentum=0.9)


def _images(n=2, shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *shape)).astype("float32")


def _logits(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def _producer(tensor):
    return tensor._keras_history[0]


# ---------------------------------------------------------------------------------------------
# The five architectures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_build_is_flat_functional_with_logits(name):
    model = _built(name)
    assert isinstance(model, Functional)
    assert model.name == name
    assert tuple(model.input.shape) == (None, 32, 32, 3)
    assert _logits(model, _images()).shape == (2, 10)
    # Flat: no nested model or composite layer, so every Conv/Dense is a direct layer.
    assert not [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    assert not [layer.name for layer in model.layers
                if isinstance(layer, COMPUTE_LAYERS) and layer._layers]
    assert sum(isinstance(layer, COMPUTE_LAYERS) for layer in model.layers) > 20
    # Logits: the last layer is linear.
    assert model.layers[-1].name == "predictions"
    assert model.layers[-1].activation.__name__ == "linear"
    # No layer rescales the input inside the model (preprocess_input does it).
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Rescaling)]
    # bn_momentum=0.9 reached every BatchNormalization layer.
    momenta = [layer.momentum for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization)]
    assert momenta and set(momenta) == {0.9}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_clone_model_keeps_structure_and_momentum(name):
    model = _built(name)
    clone = keras.models.clone_model(model)
    assert [type(layer) for layer in clone.layers] == [type(layer) for layer in model.layers]
    assert {layer.momentum for layer in clone.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}


def test_bn_momentum_none_keeps_keras_defaults():
    model = models.build("mobilenet_v3_small")
    assert {layer.momentum for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.999}


def test_mobilenet_v3_head_and_dropout():
    model = _built("mobilenet_v3_small")
    assert isinstance(model.get_layer("logits"), keras.layers.Conv2D)
    assert model.get_layer("logits").filters == 10
    # The last feature map is 1x1 at 32x32 input (total stride 32).
    assert tuple(model.get_layer("conv_1").output.shape[1:3]) == (1, 1)
    rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert rates == [0.2]  # Keras' default is kept when dropout=0
    custom = models.build("mobilenet_v3_small", dropout=0.5)
    assert [layer.rate for layer in custom.layers
            if isinstance(layer, keras.layers.Dropout)] == [0.5]


def test_dropout_before_dense_head():
    model = models.build("mobilenet_v2", dropout=0.3)
    assert isinstance(model.layers[-2], keras.layers.Dropout) and model.layers[-2].rate == 0.3
    assert not [layer for layer in _built("mobilenet_v2").layers
                if isinstance(layer, keras.layers.Dropout)]


def test_non_default_shapes():
    model = models.build("mobilenet_v2", input_shape=(48, 40, 1), num_classes=3)
    assert _logits(model, _images(shape=(48, 40, 1))).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# ResNet-18
# ---------------------------------------------------------------------------------------------


def test_resnet18_layer_counts_and_params():
    model = _built("resnet18")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    # 1 stem + 16 block convs + 3 projection shortcuts.
    assert len(convs) == 20
    assert len([c for c in convs if "shortcut" in c.name]) == 3
    assert len(dense) == 1 and dense[0].name == "predictions"
    assert all(not c.use_bias for c in convs)
    assert len(model.layers) == len({layer.name for layer in model.layers})
    # Trainable parameters of the CIFAR ResNet-18 in kuangliu/pytorch-cifar (10 classes).
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 11_173_962


def test_resnet18_cifar_stem_and_macs():
    model = _built("resnet18")
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert tuple(model.get_layer("stage4_block2_relu2").output.shape[1:]) == (4, 4, 512)
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            macs += h * w * c_out * k_h * k_w * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
    # By hand: stem 32*32*64*27 = 1,769,472; stage 1: 4 * 32*32*64*64*9 = 150,994,944; stages
    # 2-4 each 18,874,368 + 3 * 37,748,736 + 2,097,152 (shortcut) = 134,217,728; Dense 5,120.
    assert macs == 555_422_720


def test_resnet18_convs_read_relu_outputs():
    model = _built("resnet18")
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.name != "stem_conv":
            assert isinstance(_producer(layer.input), keras.layers.ReLU), layer.name
        if isinstance(layer, keras.layers.Add):
            assert isinstance(layer._outbound_nodes[0].operation, keras.layers.ReLU)


def test_resnet20_layer_counts_params_and_shapes():
    model = _built("resnet20")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    # 1 stem + 18 block convs + 2 projection shortcuts (stages 2 and 3), 16-32-64 filters.
    assert len(convs) == 21
    assert sorted(c.name for c in convs if "shortcut" in c.name) == [
        "stage2_block1_shortcut_conv", "stage3_block1_shortcut_conv"]
    assert {c.filters for c in convs} == {16, 32, 64}
    assert len(dense) == 1 and dense[0].name == "predictions"
    assert all(not c.use_bias for c in convs)
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1) and stem.filters == 16
    assert tuple(model.get_layer("stage1_block3_relu2").output.shape[1:]) == (32, 32, 16)
    assert tuple(model.get_layer("stage2_block3_relu2").output.shape[1:]) == (16, 16, 32)
    assert tuple(model.get_layer("stage3_block3_relu2").output.shape[1:]) == (8, 8, 64)
    # He et al.'s 0.27M: 270,410 with option A shortcuts + 2 projections (512 + 2,048
    # weights) and their BN (64 + 128 parameters) = 272,474 (BN moving stats excluded).
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 272_474
    for layer in convs[1:]:
        assert isinstance(_producer(layer.input), keras.layers.ReLU), layer.name


def test_resnet20_quantizes_every_conv_and_dense():
    from metamix_tf.config import QuantConfig
    from metamix_tf.quant import wrap

    model = wrap.apply(_built("resnet20"), QuantConfig())
    assert len(wrap.quant_layers(model)) == 22
    assert _logits(model, _images()).shape == (2, 10)
    with pytest.raises(ValueError, match=r"no ImageNet weights for resnet20"):
        models.build("resnet20", weights="imagenet")


@pytest.mark.parametrize("side,stem", [(64, "cifar"), (65, "imagenet")])
def test_resnet18_stem_depends_on_input_size(side, stem):
    model = models.resnet18(input_shape=(side, side, 3), num_classes=5)
    conv = model.get_layer("stem_conv")
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    if stem == "cifar":
        assert conv.kernel_size == (3, 3) and conv.strides == (1, 1) and not pools
    else:
        assert conv.kernel_size == (7, 7) and conv.strides == (2, 2)
        assert [p.name for p in pools] == ["stem_pool"]
    assert tuple(model.output.shape) == (None, 5)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_name():
    with pytest.raises(ValueError, match=r"Received: name='vgg16'$") as info:
        models.build("vgg16")
    for name in models.MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"Received: name='ResNet50'$"):
        models.preprocess_input("ResNet50")


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, r"Received: num_classes=1$"),
    ({"num_classes": True}, r"Received: num_classes=True$"),
    ({"input_shape": (32, 32)}, r"Received: input_shape=\(32, 32\)$"),
    ({"input_shape": (0, 32, 3)}, r"Received: input_shape=\(0, 32, 3\)$"),
    ({"input_shape": (28, 28, 1)}, r">= 32\. Received: input_shape=\(28, 28, 1\)$"),
    ({"dropout": 1.0}, r"Received: dropout=1\.0$"),
    ({"bn_momentum": 1.5}, r"Received: bn_momentum=1\.5$"),
    ({"weights": 3}, r"Received: weights=3$"),
    ({"weights": "imagenet", "input_shape": (32, 32, 1)}, r"3 input channels"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build("mobilenet_v2", **kwargs)


def test_resnet18_accepts_small_inputs_but_not_imagenet():
    model = models.build("resnet18", input_shape=(28, 28, 1))
    assert _logits(model, _images(shape=(28, 28, 1))).shape == (2, 10)
    with pytest.raises(ValueError, match=r"no ImageNet weights for resnet18"):
        models.build("resnet18", weights="imagenet")


def test_missing_weights_path(tmp_path):
    path = str(tmp_path / "absent.weights.h5")
    with pytest.raises(FileNotFoundError) as info:
        models.build("resnet18", weights=path)
    assert str(info.value) == f"Weights file not found. Received: weights={path!r}"


def test_weights_path_with_unknown_extension(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"'\.keras' or '\.weights\.h5'"):
        models.build("resnet18", weights=str(path))


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,suffix", [
    ("resnet18", ".weights.h5"),
    ("mobilenet_v2", ".weights.h5"),
    ("mobilenet_v3_small", ".keras"),
])
def test_weights_file_round_trip(tmp_path, name, suffix):
    model = models.build(name)
    rng = np.random.default_rng(1)
    for w in model.weights:  # moves every variable, BN statistics included, off its init
        w.assign(w.numpy() + rng.normal(0.0, 0.01, w.shape).astype(w.dtype))
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".keras":
        model.save(path)
    else:
        model.save_weights(path)
    # Another dropout rate changes no variable, so the file still fits.
    loaded = models.build(name, weights=path, dropout=0.25)
    images = _images(4)
    np.testing.assert_array_equal(_logits(loaded, images), _logits(model, images))
    for ours, theirs in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_weights_that_do_not_fit(tmp_path):
    path = str(tmp_path / "resnet18.weights.h5")
    _built("resnet18").save_weights(path)
    with pytest.raises(ValueError, match=r"do not fit model 'resnet18'.*shape mismatch.*"
                                         r"Received: weights="):
        models.build("resnet18", num_classes=5, weights=path)
    with pytest.raises(ValueError, match=r"do not fit model 'mobilenet_v3_small'"):
        models.build("mobilenet_v3_small", weights=path)


def test_weights_file_with_extra_layers_does_not_fit(tmp_path):
    base = _built("resnet18")
    bigger = keras.Model(base.input, keras.layers.Dense(3)(base.output))
    path = str(tmp_path / "bigger.weights.h5")
    bigger.save_weights(path)  # Keras alone would load the first 21 layers and ignore the rest
    with pytest.raises(ValueError, match=r"array\(s\) the model does not have"):
        models.build("resnet18", weights=path)


# ---------------------------------------------------------------------------------------------
# "imagenet", with the download replaced by a random-weights reference
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def offline_imagenet(monkeypatch):
    """Makes keras.applications constructors build random weights when asked for "imagenet"."""
    references = []

    def fake(ctor):
        def make(**kwargs):
            if kwargs.get("weights") == "imagenet":
                assert kwargs["input_shape"] == (224, 224, 3) and kwargs["include_top"]
                kwargs["weights"] = None
                references.append(ctor(**kwargs))
                return references[-1]
            return ctor(**kwargs)
        return make

    for name, ctor in list(models._KERAS_APPS.items()):
        monkeypatch.setitem(models._KERAS_APPS, name, fake(ctor))
    return references


@pytest.mark.parametrize("name,num_classes,classifier", [
    ("mobilenet_v3_small", 10, "logits"),
    ("mobilenet_v3_small", 1000, "logits"),
    ("mobilenet_v2", 10, "predictions"),
])
def test_imagenet_weights_are_copied_by_layer(offline_imagenet, name, num_classes, classifier):
    model = models.build(name, num_classes=num_classes, weights="imagenet", bn_momentum=0.9)
    (reference,) = offline_imagenet
    copied = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        ours, theirs = layer.get_weights(), reference.get_layer(layer.name).get_weights()
        same = len(ours) == len(theirs) and all(
            np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
        if layer.name == classifier and num_classes != 1000:
            assert not same
        else:
            assert same, layer.name
            copied += 1
    assert copied > 50
    assert _logits(model, _images()).shape == (2, num_classes)


# ---------------------------------------------------------------------------------------------
# set_bn_momentum
# ---------------------------------------------------------------------------------------------


def test_set_bn_momentum_recurses_into_nested_models():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization()])
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization()(inputs)
    outer = keras.Model(inputs, inner(x))
    assert models.set_bn_momentum(outer, 0.5) == 2
    assert inner.layers[-1].momentum == 0.5 and outer.layers[1].momentum == 0.5
    with pytest.raises(ValueError, match=r"Received: momentum=1\.0$"):
        models.set_bn_momentum(outer, 1.0)


# ---------------------------------------------------------------------------------------------
# preprocess_input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in models.MODEL_NAMES if n != "resnet50"])
def test_preprocess_to_symmetric_unit_range(name):
    images = np.array([[0.0, 127.5, 255.0]], dtype="float32")
    out = models.preprocess_input(name)(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-1.0, 0.0, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(images, [[0.0, 127.5, 255.0]])


def test_preprocess_resnet50_is_keras_caffe():
    images = _images(2)
    original = images.copy()
    out = models.preprocess_input("resnet50")(images)
    np.testing.assert_array_equal(images, original)  # Keras' function alone edits in place
    np.testing.assert_allclose(
        out, keras.applications.resnet.preprocess_input(original.copy()), rtol=1e-6)
    assert out.min() >= -123.68 and out.max() <= 255 - 103.939
    gray = models.preprocess_input("resnet50")(np.full((1, 2, 2, 1), 255.0, "float32"))
    np.testing.assert_allclose(gray, 255.0 - np.mean([103.939, 116.779, 123.68]), rtol=1e-6)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_preprocess_in_tf_data(name):
    images = _images(2, shape=(4, 4, 3))
    fn = models.preprocess_input(name)
    dataset = tf.data.Dataset.from_tensor_slices(images).map(fn).batch(2)
    (batch,) = list(dataset.as_numpy_iterator())
    np.testing.assert_allclose(batch, fn(images), rtol=1e-5, atol=1e-4)

