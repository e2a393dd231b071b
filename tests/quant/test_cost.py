"""metamix_tf.quant.cost: MACs by hand, GBOPs, the differentiable expected GBOPs, target bounds and
the report."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import metamix_tf as mm
from metamix_tf.quant.cost import CostModel, layer_macs

L = keras.layers

# MobileNetV2 (width 1.0, 224x224, 1000 classes) multiply-accumulates of its Conv2D,
# DepthwiseConv2D and Dense layers: the ~300M "MAdds" of Sandler et al. 2018, Table 3.
# Computed below from the architecture table (mobilenet_v2_macs_from_table) and from the
# Keras model's layer shapes; both give this number.
MOBILENET_V2_224_MACS = 300_774_272


def mobilenet_v2_macs_from_table(size=224, classes=1000):
    """By hand from the paper's table: stem 3x3/2 conv to 32 channels; bottlenecks
    (expansion t, channels c, repeats n, stride s), each a 1x1 expansion (when t > 1), a 3x3
    depthwise conv and a 1x1 projection; a 1x1 conv to 1280 channels; the classifier."""
    h = size // 2
    macs = h * h * 32 * (3 * 3 * 3)
    c_in = 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            hidden = c_in * t
            if t > 1:
                macs += h * h * hidden * c_in  # expansion, at the input resolution
            h //= s if i == 0 else 1
            macs += h * h * hidden * 3 * 3  # depthwise
            macs += h * h * c * hidden  # projection
            c_in = c
    macs += h * h * 1280 * c_in
    return macs + 1280 * classes


def macs_from_layer_shapes(model):
    """From each layer's output shape, kernel size and input channels (not its kernel)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, L.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            total += h * w * c * int(np.prod(layer.kernel_size))
        elif isinstance(layer, L.Conv2D):
            _, h, w, c = layer.output.shape
            c_in = layer.input.shape[-1]
            total += h * w * c * int(np.prod(layer.kernel_size)) * c_in // layer.groups
        elif isinstance(layer, L.Dense):
            total += layer.input.shape[-1] * layer.units
    return total


@pytest.fixture
def mobilenet_v2_224():
    return keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None)


def test_mobilenet_v2_macs_by_hand(mobilenet_v2_224):
    assert mobilenet_v2_macs_from_table() == MOBILENET_V2_224_MACS
    assert macs_from_layer_shapes(mobilenet_v2_224) == MOBILENET_V2_224_MACS
    wrapped = mm.apply(mobilenet_v2_224)
    assert CostModel(wrapped).total_macs == MOBILENET_V2_224_MACS


@pytest.mark.parametrize("bits,bops_per_mac", [(8, 64), (4, 16)])
def test_mobilenet_v2_gbops(mobilenet_v2_224, bits, bops_per_mac):
    config = mm.QuantConfig(candidate_bits=(bits,), weight_bits=bits, first_last_bits=None)
    cost = CostModel(mm.apply(mobilenet_v2_224, config))
    expected = MOBILENET_V2_224_MACS * bops_per_mac / 1e9
    assert cost.gbops() == pytest.approx(expected, rel=1e-12)
    assert cost.uniform_gbops(bits) == pytest.approx(expected, rel=1e-12)
    assert cost.bounds() == pytest.approx((expected, expected), rel=1e-12)


@pytest.mark.parametrize("layer,input_shape,expected", [
    (L.Conv2D(8, 3, padding="same"), (10, 10, 4), 10 * 10 * 8 * 9 * 4),
    (L.Conv2D(8, 3, strides=2, padding="valid"), (11, 11, 4), 5 * 5 * 8 * 9 * 4),
    (L.Conv2D(8, (1, 3), groups=2, padding="same"), (6, 6, 4), 6 * 6 * 8 * 3 * 2),
    (L.DepthwiseConv2D(3, padding="same"), (10, 10, 4), 10 * 10 * 4 * 9),
    (L.DepthwiseConv2D(5, depth_multiplier=2, strides=2, padding="same"), (8, 8, 3),
     4 * 4 * 6 * 25),
    (L.Dense(7), (12,), 12 * 7),
])
def test_layer_macs(layer, input_shape, expected):
    inp = keras.Input(input_shape)
    layer(inp)
    assert layer_macs(layer) == expected


def test_layer_macs_needs_a_fixed_input_size():
    inp = keras.Input((None, None, 3))
    layer = L.Conv2D(4, 3, name="conv")
    layer(inp)
    with pytest.raises(ValueError, match="'conv' has an undefined output shape"):
        layer_macs(layer)


# -- a small wrapped model for the rest ------------------------------------------------------
def _small(candidate_bits=(2, 4, 8)):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(16, 1, name="pw")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(5, name="fc")(x))
    return mm.apply(model, mm.QuantConfig(candidate_bits=candidate_bits, weight_bits=4))


SMALL_MACS = {"conv1": 64 * 8 * 27, "dw": 64 * 8 * 9, "pw": 64 * 16 * 8, "fc": 16 * 5}


def test_small_model_costs():
    model = _small()
    cost = CostModel(model)
    assert {c.name: c.macs for c in cost.layers} == SMALL_MACS
    assert [c.searchable for c in cost.layers] == [False, True, True, False]
    assert [c.w_bits for c in cost.layers] == [8, 4, 4, 8]
    bits = {"conv1": 8, "dw": 2, "pw": 4, "fc": 8}
    expected = sum(SMALL_MACS[n] * b * (8 if n in ("conv1", "fc") else 4)
                   for n, b in bits.items()) / 1e9
    assert cost.gbops(bits) == pytest.approx(expected)
    mm.select_bits(model, bits)
    assert cost.gbops() == pytest.approx(expected)  # default: the selected bits
    low = (SMALL_MACS["conv1"] * 64 + SMALL_MACS["fc"] * 64
           + (SMALL_MACS["dw"] + SMALL_MACS["pw"]) * 2 * 4) / 1e9
    high = low + (SMALL_MACS["dw"] + SMALL_MACS["pw"]) * (8 - 2) * 4 / 1e9
    assert cost.bounds() == pytest.approx((low, high))
    assert cost.uniform_gbops(2) == pytest.approx(low)
    assert cost.uniform_gbops(8) == pytest.approx(high)


def test_expected_gbops_forward_is_argmax_and_gradient_flows():
    model = _small()
    cost = CostModel(model)
    alphas = {"dw": [0.3, 1.2, -0.5], "pw": [2.0, 0.1, 0.4]}  # argmax: 4 and 2 bits
    for name, alpha in alphas.items():
        model.get_layer(name).input_quantizer.alpha.assign(alpha)
    variables = mm.variable_groups(model).alphas
    with tf.GradientTape() as tape:
        gbops = cost.argmax_gbops_ste()
    argmax_bits = {"conv1": 8, "dw": 4, "pw": 2, "fc": 8}
    assert gbops.numpy() == pytest.approx(cost.gbops(argmax_bits), rel=1e-6)
    grads = tape.gradient(gbops, variables)
    assert len(grads) == 2
    for name, grad in zip(("dw", "pw"), grads, strict=True):
        # d/d(alpha) of sum_b softmax(alpha)_b * b, times MACs * w_bits / 1e9
        p = tf.nn.softmax(alphas[name]).numpy()
        bits = np.array([2, 4, 8])
        expected = p * (bits - np.sum(p * bits)) * SMALL_MACS[name] * 4 / 1e9
        np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5)
        assert np.abs(grad.numpy()).max() > 0


def test_check_target():
    cost = CostModel(_small())
    low, high = cost.bounds()
    for target in (low, (low + high) / 2, high):
        assert cost.check_target(target) == pytest.approx(target)
    for bad in (low * 0.99, high * 1.01, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="Received: target_gbops=") as info:
            cost.check_target(bad)
        assert info.match(r"\[\d+\.\d{4}, \d+\.\d{4}\]")  # states the allowed range


def test_report_and_format_report():
    model = _small()
    bits = mm.select_bits(model, {"dw": 2, "pw": 8})
    cost = CostModel(model)
    report = cost.report()
    assert set(report) == {"gbops", "macs", "avg_activation_bits",
                           "mac_weighted_activation_bits", "weight_memory_bytes",
                           "activation_memory_bytes", "layers", "unsupported_float_layers"}
    assert report["gbops"] == pytest.approx(cost.gbops(bits))
    assert report["macs"] == sum(SMALL_MACS.values())
    assert report["avg_activation_bits"] == pytest.approx(5.0)  # searchable: 2 and 8
    assert report["mac_weighted_activation_bits"] == pytest.approx(
        (2 * SMALL_MACS["dw"] + 8 * SMALL_MACS["pw"]) / (SMALL_MACS["dw"] + SMALL_MACS["pw"]))
    params = {"conv1": 27 * 8, "dw": 9 * 8, "pw": 8 * 16, "fc": 16 * 5}
    w_bits = {"conv1": 8, "dw": 4, "pw": 4, "fc": 8}
    assert report["weight_memory_bytes"] == sum(params[n] * w_bits[n] for n in params) / 8
    inputs = {"conv1": 64 * 3, "dw": 64 * 8, "pw": 64 * 8, "fc": 16}
    assert report["activation_memory_bytes"] == sum(inputs[n] * bits[n] for n in inputs) / 8
    assert report["unsupported_float_layers"] == []
    assert [row["name"] for row in report["layers"]] == ["conv1", "dw", "pw", "fc"]
    assert set(report["layers"][0]) == {"name", "type", "macs", "a_bits", "w_bits", "signed",
                                        "searchable", "gbops"}
    assert report["layers"][1] | {"gbops": None} == dict(
        name="dw", type="QuantDepthwiseConv2D", macs=SMALL_MACS["dw"], a_bits=2, w_bits=4,
        signed=False, searchable=True, gbops=None)

    text = cost.format_report()
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "MACs", "A", "W", "sign", "GBOPs"]
    assert len(lines) == 1 + 4 + 1
    assert lines[2].split() == ["dw", "QuantDepthwiseConv2D", f"{SMALL_MACS['dw']:,}", "2", "4",
                                "u", f"{SMALL_MACS['dw'] * 8 / 1e9:.4f}"]
    assert lines[1].split()[5] == "s"  # the model input is signed
    assert lines[-1].startswith(f"total: {report['gbops']:.4f} GBOPs")
    assert "avg activation bits 5.00" in lines[-1]
    # explicit bits override the selected ones
    assert cost.report({"conv1": 8, "dw": 8, "pw": 8, "fc": 8})["avg_activation_bits"] == 8.0


def test_fit_to_target_lowers_the_least_preferred_bits_per_gbop():
    cost = CostModel(_small())
    bits = {"conv1": 8, "dw": 8, "pw": 8, "fc": 8}
    # dw is strongly preferred at 8 bits, pw barely: pw goes down first, dw only if needed
    scores = {"dw": np.array([0.0, 0.0, 5.0]), "pw": np.array([0.0, 0.0, 0.1])}
    assert cost.fit_to_target(bits, cost.gbops(bits), scores) == bits  # already within
    pw_at_4 = {**bits, "pw": 4}
    fitted = cost.fit_to_target(bits, cost.gbops(pw_at_4), scores)
    assert fitted == pw_at_4
    assert bits["pw"] == 8  # the argument is not changed
    low, _ = cost.bounds()
    assert cost.fit_to_target(bits, low, scores) == {"conv1": 8, "dw": 2, "pw": 2, "fc": 8}
    # just below "pw at 2": one more step is needed, and it lowers dw (8 -> 4)
    target = cost.gbops({**bits, "pw": 2}) * 0.999
    fitted = cost.fit_to_target(bits, target, scores)
    assert cost.gbops(fitted) <= target and fitted == {**bits, "pw": 2, "dw": 4}


def test_fit_to_target_errors():
    cost = CostModel(_small())
    bits = {"conv1": 8, "dw": 8, "pw": 8, "fc": 8}
    with pytest.raises(ValueError, match="no entry for searchable layers"):
        cost.fit_to_target(bits, cost.bounds()[0], {"dw": np.zeros(3)})
    with pytest.raises(ValueError, match="outside what the candidate bits allow"):
        cost.fit_to_target(bits, cost.bounds()[0] * 0.5, {"dw": np.zeros(3), "pw": np.zeros(3)})
