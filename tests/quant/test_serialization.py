"""Saving and loading wrapped models, get_config round trips, and the quantized layers'
signatures against their stock parents."""

import inspect

import keras
import numpy as np
import pytest

import metamix_tf as mm
from metamix_tf.quant.layers import QUANT_LAYERS, QuantConv2D, QuantDense, QuantDepthwiseConv2D
from metamix_tf.quant.quantizers import ActivationQuantizer, WeightQuantizer

L = keras.layers


def _small_float_model():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(6.0, name="relu1")(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, name="dw")(x)
    x = L.ReLU(6.0, name="relu2")(x)
    y = L.Conv2D(16, 1, name="pw")(x)
    y = L.Add(name="add")([y, L.Conv2D(16, 1, name="skip")(x)])
    y = L.GlobalAveragePooling2D(name="pool")(y)
    return keras.Model(inp, L.Dense(4, name="fc")(y), name="small")


def _selected_model():
    """A wrapped model in selected mode (mixed bits) with weight quantization on and
    calibrated, not-default step sizes."""
    x = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32)
    model = mm.apply(_small_float_model(), mm.QuantConfig(candidate_bits=(2, 3, 4, 8)))
    mm.calibrate(model, x)
    model.get_layer("dw").input_quantizer.alpha.assign([0.0, 0.0, 1.0, 0.0])
    bits = mm.select_bits(model, {"pw": 2, "skip": 3})
    mm.enable_weight_quantization(model)
    return model, x, bits


def test_save_and_load_keras_file(tmp_path):
    model, x, bits = _selected_model()
    assert bits == {"conv1": 8, "dw": 4, "pw": 2, "skip": 3, "fc": 8}
    expected = model(x, training=False).numpy()
    path = str(tmp_path / "selected.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)

    np.testing.assert_array_equal(loaded(x, training=False).numpy(), expected)
    assert mm.get_bits(loaded) == bits
    assert {q.mode for q in mm.activation_quantizers(loaded)} == {"selected"}
    assert all(wq.enabled for wq in mm.weight_quantizers(loaded))
    for layer in mm.quant_layers(model):
        twin = loaded.get_layer(layer.name)
        assert type(twin) is type(layer)
        for a, b in zip(layer.weights, twin.weights, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # same trainable variables, split the same way
    assert len(mm.variable_groups(loaded).alphas) == 3
    assert len(loaded.trainable_variables) == len(model.trainable_variables)


def _round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    return clone


def _squeeze_excite_hard_swish_model():
    """MobileNetV3's parts as keras.applications writes them: a hard-sigmoid gate
    ``relu6(x + 3) * (1 / 6)`` from keras.ops on KerasTensors and an
    ``Activation("hard_swish")``."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = L.Activation("hard_swish", name="hswish")(x)
    g = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    g = L.Conv2D(8, 1, name="se_conv")(g)
    g = L.ReLU(6.0, name="se_relu6")(g + 3.0) * (1.0 / 6.0)
    x = L.Multiply(name="se_mul")([x, g])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(4, name="fc")(x), name="v3_parts")


def test_mobilenet_v3_parts_wrap_after_loading_and_load_after_wrapping(tmp_path):
    """A float model loaded in a fresh Keras session wraps (the hard-swish rewrite's ops did
    take names the loaded model already used), and the wrapped model loads again (a
    tensor times a Python number is a sparse spec to Keras, which a quantizer after it could
    not trace); float mode equals the original at every step."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    _squeeze_excite_hard_swish_model().save(tmp_path / "float.keras")
    keras.backend.clear_session()  # auto names start again, as in a new process
    original = keras.models.load_model(tmp_path / "float.keras")
    wrapped = mm.apply(original, mm.QuantConfig())
    mm.calibrate(wrapped, x)
    mm.select_bits(wrapped)  # saved in "selected" mode, as the search phase saves it
    wrapped.save(tmp_path / "wrapped.keras")
    loaded = keras.models.load_model(tmp_path / "wrapped.keras")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(wrapped(x)))
    for model in (wrapped, loaded):
        mm.set_mode(model, "float")
        np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(original(x)))


def test_every_layer_config_round_trips():
    model, _, _ = _selected_model()
    kinds = set()
    for layer in model.layers:
        clone = _round_trip(layer)
        kinds.add(type(layer))
        if isinstance(layer, (QuantConv2D, QuantDense, QuantDepthwiseConv2D)):
            for name in ("input_quantizer", "kernel_quantizer"):
                original, copy = getattr(layer, name), getattr(clone, name)
                assert type(copy) is type(original)
                assert copy.get_config() == original.get_config()
    assert {QuantConv2D, QuantDense, QuantDepthwiseConv2D} <= kinds


@pytest.mark.parametrize("quantizer", [
    ActivationQuantizer(),
    ActivationQuantizer(candidate_bits=(8, 3, 5), signed=True, grad_scale="none",
                        temperature=0.5, mode="mixture", name="aq"),
    ActivationQuantizer(candidate_bits=(16,), mode="selected"),
    WeightQuantizer(),
    WeightQuantizer(bits=6, channel_axes=2, enabled=True, name="wq"),
], ids=["aq_default", "aq_custom", "aq_single", "wq_default", "wq_custom"])
def test_quantizer_config_round_trips(quantizer):
    clone = _round_trip(quantizer)
    for attribute in ("candidate_bits", "signed", "grad_scale", "temperature", "mode", "bits",
                      "channel_axes", "enabled"):
        assert getattr(clone, attribute, None) == getattr(quantizer, attribute, None)


def test_quantizers_as_config_dicts():
    aq = ActivationQuantizer(candidate_bits=(2, 4), signed=True)
    layer = QuantConv2D(4, 3, input_quantizer=keras.saving.serialize_keras_object(aq),
                        kernel_quantizer=WeightQuantizer(bits=3))
    assert isinstance(layer.input_quantizer, ActivationQuantizer)
    assert layer.input_quantizer.candidate_bits == (2, 4) and layer.input_quantizer.signed
    _round_trip(layer)
    with pytest.raises(ValueError, match="Received:"):
        QuantConv2D(4, 3, input_quantizer="lsq")
    with pytest.raises(ValueError, match="Received:"):
        QuantDense(4, kernel_quantizer=keras.saving.serialize_keras_object(aq))


@pytest.mark.parametrize("quant_cls,stock_cls", [(q, s) for s, q in QUANT_LAYERS],
                         ids=lambda c: c.__name__)
def test_quantized_layers_accept_every_parameter_of_their_parent(quant_cls, stock_cls):
    """Same parameters in the same order with the same defaults and kinds (so positional
    calls work too), plus the two quantizer arguments."""
    stock = inspect.signature(stock_cls.__init__).parameters
    quant = inspect.signature(quant_cls.__init__).parameters
    assert issubclass(quant_cls, stock_cls)
    named = [n for n, p in stock.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(quant)[:len(named)] == named
    for name in named:
        assert quant[name].default == stock[name].default, name
        assert quant[name].kind == stock[name].kind, name
    extra = [n for n in quant if n not in stock]
    assert extra == ["input_quantizer", "kernel_quantizer"]
    assert all(quant[n].default is None for n in extra)
    assert list(quant)[-1] == "kwargs" and quant["kwargs"].kind is inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("quant_cls,stock_cls", [(q, s) for s, q in QUANT_LAYERS],
                         ids=lambda c: c.__name__)
def test_quantized_layer_without_quantizers_equals_stock_layer(quant_cls, stock_cls):
    """Built from the stock layer's config, with no quantizers, it computes the same."""
    inp = keras.Input((6, 6, 4))
    args = {QuantDense: dict(units=5), QuantConv2D: dict(filters=5, kernel_size=3),
            QuantDepthwiseConv2D: dict(kernel_size=3, depth_multiplier=2)}[quant_cls]
    stock = stock_cls(**args, activation="relu", name="layer")
    stock(inp)
    quant = quant_cls(**stock.get_config())
    quant(inp)
    quant.set_weights(stock.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(quant(x).numpy(), stock(x).numpy())
