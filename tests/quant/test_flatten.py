"""metamix_tf.quant.flatten: nested functional / Sequential models become one flat graph with the
same names and weights, and apply() quantizes the layers inside them."""

import keras
import numpy as np
import pytest

import metamix_tf as mm
from metamix_tf.quant import wrap
from metamix_tf.quant.flatten import flatten

L = keras.layers
QUANTIZABLE = (L.Conv2D, L.DepthwiseConv2D, L.Dense)


def images(n=4, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _block(name, channels=3):
    """A small functional model with BatchNorm, whose layer names repeat across calls."""
    inp = keras.Input((8, 8, channels))
    x = L.Conv2D(channels, 3, padding="same", name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    return keras.Model(inp, L.ReLU(name="relu")(x), name=name)


def _randomize_bn(model):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
                               for w in layer.get_weights()])


def test_nested_backbone_is_quantized_layer_by_layer():
    base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                          input_shape=(32, 32, 3))
    inp = keras.Input((32, 32, 3))
    head = L.Dense(10, name="head")
    model = keras.Model(inp, head(L.GlobalAveragePooling2D()(base(inp))))
    qmodel = mm.apply(model)
    expected = [layer.name for layer in base.layers if isinstance(layer, QUANTIZABLE)]
    assert [layer.name for layer in mm.quant_layers(qmodel)] == expected + ["head"]
    assert len(expected) == 52  # Conv1, 17 depthwise, 17 project, 16 expand, Conv_1
    assert wrap.unsupported_layers(qmodel) == []
    x = images()
    np.testing.assert_array_equal(qmodel(x).numpy(), model(x).numpy())  # float mode


def test_flat_graph_has_the_same_names_weights_and_outputs():
    inner = keras.Sequential([L.Dense(5, name="d2"), L.Dense(3, name="d3")], name="inner")
    inp = keras.Input((6,))
    mid = keras.Model(inp, inner(L.Dense(4, name="d1")(inp)), name="mid")
    outer_in = keras.Input((6,))
    model = keras.Model(outer_in, L.Dense(2, name="top")(mid(outer_in)))
    flat = flatten(model)
    names = [layer.name for layer in flat.layers[1:]]
    assert names == ["d1", "d2", "d3", "top"]
    for name in names:
        original = (model.get_layer(name) if name == "top" else
                    mid.get_layer(name) if name == "d1" else inner.get_layer(name))
        for a, b in zip(flat.get_layer(name).get_weights(), original.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert flat.get_layer(name) is not original  # copies: the original is untouched
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_array_equal(flat(x).numpy(), model(x).numpy())


def test_model_without_nested_models_is_returned_as_is():
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(2)(inp))
    assert flatten(model) is model


def test_repeated_names_get_the_nested_model_prefix_and_training_flag_is_kept():
    a, b = _block("block_a"), _block("block_b")
    inp = keras.Input((8, 8, 3))
    x = b(a(inp), training=False)  # the transfer-learning idiom: frozen BatchNorm in b
    model = keras.Model(inp, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x)))
    _randomize_bn(model)
    flat = flatten(model)
    assert [layer.name for layer in flat.layers[1:4]] == ["conv", "bn", "relu"]
    assert "block_b_conv" in [layer.name for layer in flat.layers]
    x = images(size=8)
    for training in (False, True):
        np.testing.assert_allclose(flat(x, training=training).numpy(),
                                   model(x, training=training).numpy(), rtol=0, atol=1e-6)
    qmodel = mm.apply(model)
    assert [layer.name for layer in mm.quant_layers(qmodel)] == ["conv", "block_b_conv", "fc"]


def test_nested_model_called_twice_is_refused():
    block = _block("shared")
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, block(block(inp)))
    with pytest.raises(ValueError, match="called more than once.*Received: model='shared'"):
        flatten(model)


def test_layers_left_float_are_named_in_a_warning():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.Conv2DTranspose(4, 3, name="deconv")(x)
    model = keras.Model(inp, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x)))
    with pytest.warns(UserWarning, match=r"stay float: \['deconv'\]"):
        mm.apply(model)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="Received: model=Net"):
        flatten(Net())
