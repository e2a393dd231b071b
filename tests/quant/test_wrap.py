"""metamix_tf.quant.wrap: apply() on real architectures, signedness, first/last layers,
include/exclude, unsupported layers, modes, bits and variable groups."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import metamix_tf as mm
from metamix_tf.export.families import set_batch_norm_statistics
from metamix_tf.quant import wrap
from metamix_tf.quant.cost import CostModel
from metamix_tf.quant.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D

L = keras.layers
APP_KWARGS = dict(input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None)
QUANTIZABLE = (L.Conv2D, L.DepthwiseConv2D, L.Dense)  # DepthwiseConv2D is no Conv2D in Keras 3


def _resnet18():
    models = pytest.importorskip("metamix_tf.models")
    if not hasattr(models, "build"):
        pytest.skip("metamix_tf.models.build is not there yet")
    return models.build("resnet18", (32, 32, 3), 10)


ARCHITECTURES = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(**APP_KWARGS),
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(
        include_preprocessing=False, **APP_KWARGS),
    "MobileNetV3Large": lambda: keras.applications.MobileNetV3Large(
        include_preprocessing=False, **APP_KWARGS),
    "ResNet50": lambda: keras.applications.ResNet50(**APP_KWARGS),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(**APP_KWARGS),
    "ResNet18": _resnet18,
}


def images(n=8, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def rel_error(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_partition(model):
    """variable_groups splits what the phases train exactly (the Keras-trainable variables
    in "mixture" mode with weight quantization on): no overlap, nothing missing."""
    groups = mm.variable_groups(model)
    ids = [id(v) for v in groups.weights + groups.steps + groups.alphas]
    assert len(ids) == len(set(ids))
    modes = [(q, q.mode) for q in mm.activation_quantizers(model)]
    enabled = [(q, q.enabled) for q in mm.weight_quantizers(model)]
    mm.set_mode(model, "mixture")
    mm.enable_weight_quantization(model, initialize=False)
    trainable = model.trainable_variables
    for q, mode in modes:  # back to the caller's state
        q.mode = mode
    for q, on in enabled:
        q.enabled = on
    assert set(ids) == {id(v) for v in trainable}
    assert len(ids) == len(trainable)
    return groups


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_apply_on_architecture(name):
    """Wraps; one quantizer per Conv2D/DepthwiseConv2D/Dense; float mode equals the original
    exactly; 8-bit after calibration is close; one mixture-mode SGD step has finite
    gradients for every weight, step size and bit logit."""
    model = ARCHITECTURES[name]()
    x = images()
    set_batch_norm_statistics(model, x)
    wrapped = mm.apply(model)

    n_quantizable = sum(isinstance(layer, QUANTIZABLE) for layer in model.layers)
    assert len(mm.activation_quantizers(wrapped)) == n_quantizable + len(
        mm.output_quantizers(wrapped))
    assert len(mm.weight_quantizers(wrapped)) == n_quantizable
    assert len(mm.quant_layers(wrapped)) == n_quantizable > 10
    assert wrap.unsupported_layers(wrapped) == []

    # float mode (the state apply() returns) computes exactly what the original does
    reference = model(x, training=False).numpy()
    np.testing.assert_array_equal(wrapped(x, training=False).numpy(), reference)

    # Uniform 8 bits after calibration. LSQ's initial step 2 mean|x| / sqrt(Qp) gives an
    # 8-bit grid coarser than the data needs (1-4% rms noise on each layer's input), and a
    # random-weight network amplifies any perturbation with depth (the end-to-end error of
    # the deep Keras models exceeds 100%), so the checks are per layer, each quantized layer
    # fed the float model's input to it: (1) its quantizer is exact LSQ at 8 bits: inside
    # the clip range within half a step of the input, outside it at the bound; (2) the
    # layer's output is within 5% relative L2 error of its float output for the median
    # layer (observed 1.5-4%) and 15% for the 75th percentile (observed at most 14%). The
    # tail is clipping: EfficientNetB0's late blocks have heavy-tailed random-weight
    # activations (max|x| up to 300 mean|x|, beyond the 8-bit clip at 22.6 mean|x|), and
    # strided depthwise layers on 1x1 maps see an input zero-padded to 5x5, so their
    # calibrated step is ~25x too small. The package's ResNet-18 is shallow enough for an
    # end-to-end bound too (observed 12%).
    mm.calibrate(wrapped, x)
    quant_layers = mm.quant_layers(wrapped)
    probe = keras.Model(wrapped.inputs[0], [layer.input for layer in quant_layers])
    layer_inputs = probe(x, training=False)  # float mode: the float model's tensors
    mm.set_uniform(wrapped, 8)
    errors = []
    for layer, layer_input in zip(quant_layers, layer_inputs, strict=True):
        q = layer.input_quantizer
        assert q.mode == "uniform" and q.candidate_bits[q.uniform_index] == 8
        step = float(q.step_size.numpy()[q.uniform_index])
        low, high = -float(q._qn[q.uniform_index]) * step, float(q._qp[q.uniform_index]) * step
        v, qv = layer_input.numpy(), q(layer_input).numpy()
        inside = (v >= low) & (v <= high)
        assert np.all(np.abs(qv - v)[inside] <= 0.5 * step * (1 + 1e-5) + 1e-7), layer.name
        np.testing.assert_allclose(qv[~inside], np.clip(v[~inside], low, high), rtol=1e-6)
        quantized = layer(layer_input).numpy()
        q.mode = "float"
        float_output = layer(layer_input).numpy()
        q.mode = "uniform"
        errors.append(rel_error(quantized, float_output))
    assert 0 < np.median(errors) < 0.05
    assert np.percentile(errors, 75) < 0.15
    if name == "ResNet18":
        assert rel_error(wrapped(x, training=False).numpy(), reference) < 0.25

    # one SGD step in mixture mode, weight quantization on: every variable gets a gradient
    mm.set_mode(wrapped, "mixture")
    mm.enable_weight_quantization(wrapped)
    groups = assert_partition(wrapped)
    assert len(groups.alphas) == n_quantizable - 2  # first and last: one fixed branch
    assert len(groups.steps) == 2 * n_quantizable + len(mm.output_quantizers(wrapped))
    variables = groups.weights + groups.steps + groups.alphas
    labels = np.arange(len(x)) % 10
    with tf.GradientTape() as tape:
        logits = wrapped(x[:4], training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels[:4], logits,
                                                            from_logits=True)
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, variables)
    missing = [v.path for v, g in zip(variables, grads, strict=True) if g is None]
    assert not missing
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    assert any(np.abs(g.numpy()).max() > 0 for g in grads[-len(groups.alphas):])
    alphas_before = [a.numpy().copy() for a in groups.alphas]
    keras.optimizers.SGD(0.1).apply(grads, variables)
    assert np.isfinite(loss.numpy())
    assert any(not np.array_equal(a.numpy(), b)
               for a, b in zip(groups.alphas, alphas_before, strict=True))


# -- signedness ------------------------------------------------------------------------------
def _signed(model):
    return {layer.name: layer.input_quantizer.signed for layer in mm.quant_layers(model)}


def test_signedness_mobilenet_v2():
    signed = _signed(mm.apply(keras.applications.MobileNetV2(**APP_KWARGS)))
    # the model input; linear bottlenecks (BatchNorm outputs); residual sums
    for name in ("Conv1", "block_1_expand", "block_2_expand", "block_3_expand", "Conv_1"):
        assert signed[name], name
    # after ReLU6, also through ZeroPadding2D (strided depthwise) and GlobalAveragePooling2D
    for name in ("expanded_conv_depthwise", "expanded_conv_project", "block_1_depthwise",
                 "block_1_project", "block_2_depthwise", "predictions"):
        assert not signed[name], name


@pytest.mark.parametrize("hswish_range", ["signed", "unsigned"])
def test_signedness_after_hard_swish_follows_config(hswish_range):
    model = keras.applications.MobileNetV3Small(include_preprocessing=False, **APP_KWARGS)
    signed = _signed(mm.apply(model, mm.QuantConfig(hswish_range=hswish_range)))
    # after hard-swish: the stem's output, block 3's expansion, the classifier's input
    for name in ("expanded_conv_depthwise", "expanded_conv_3_depthwise", "conv_2", "logits"):
        assert signed[name] == (hswish_range == "signed"), name
    # after ReLU (blocks 1 and 2 use ReLU), and the model input, whatever the config
    assert not signed["expanded_conv_1_depthwise"] and not signed["expanded_conv_2_project"]
    assert signed["conv"] and signed["expanded_conv_3_expand"]  # input; residual sum


def test_signedness_of_small_graph():
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(a)  # after a fused relu: unsigned
    c = L.LeakyReLU(name="leaky")(b)
    d = L.Conv2D(4, 1, name="d")(c)  # after a leaky relu: signed
    e = L.ReLU(negative_slope=0.1, name="relu_slope")(d)
    f = L.Conv2D(4, 1, name="f")(L.MaxPooling2D(name="pool")(e))  # slope > 0: signed
    g = L.Conv2D(4, 1, name="g")(L.Activation("sigmoid")(f))  # sigmoid: unsigned
    h = L.Dense(2, name="h")(L.Flatten()(L.ReLU(6.0)(g)))  # through Flatten: unsigned
    signed = _signed(mm.apply(keras.Model(inp, h)))
    assert signed == {"a": True, "b": False, "d": True, "f": True, "g": False, "h": False}


# -- configuration: first/last, include/exclude, errors ---------------------------------------
def _tiny(name="tiny"):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(8, 1, name="pw")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="fc")(x), name=name)


def test_first_and_last_layers_fixed_at_first_last_bits():
    model = mm.apply(keras.applications.MobileNetV2(**APP_KWARGS),
                     mm.QuantConfig(candidate_bits=(2, 4), weight_bits=4, first_last_bits=8))
    layers = mm.quant_layers(model)
    assert (layers[0].name, layers[-1].name) == ("Conv1", "predictions")
    for layer in (layers[0], layers[-1]):
        q, wq = layer.input_quantizer, layer.kernel_quantizer
        assert q.candidate_bits == (8,) and q.num_branches == 1 and not q.searchable
        assert wq.bits == 8
    for layer in layers[1:-1]:
        assert layer.input_quantizer.candidate_bits == (2, 4)
        assert layer.kernel_quantizer.bits == 4
    assert len(mm.activation_quantizers(model, searchable_only=True)) == len(layers) - 2

    model = mm.apply(_tiny(), mm.QuantConfig(candidate_bits=(2, 4), first_last_bits=None))
    assert all(layer.input_quantizer.candidate_bits == (2, 4)
               for layer in mm.quant_layers(model))
    # pooling input, pooling output (TFLite cannot clamp a pooled tensor), logits
    assert [q.candidate_bits for q in mm.output_quantizers(model)] == [(8,), (8,), (8,)]


def test_include_and_exclude():
    model = mm.apply(_tiny(), mm.QuantConfig(include=("dw", "pw")))
    assert [layer.name for layer in mm.quant_layers(model)] == ["dw", "pw"]
    assert type(model.get_layer("conv1")) is L.Conv2D and type(model.get_layer("fc")) is L.Dense
    assert isinstance(model.get_layer("dw"), QuantDepthwiseConv2D)
    # first/last among the quantized layers
    assert model.get_layer("dw").input_quantizer.candidate_bits == (8,)

    model = mm.apply(_tiny(), mm.QuantConfig(exclude=("conv1",)))
    assert [layer.name for layer in mm.quant_layers(model)] == ["dw", "pw", "fc"]
    assert type(model.get_layer("conv1")) is L.Conv2D
    assert isinstance(model.get_layer("pw"), QuantConv2D)
    assert isinstance(model.get_layer("fc"), QuantDense)


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_unknown_layer_names_raise(argument):
    with pytest.raises(ValueError, match=rf"Received: {argument}=\['nope'\]"):
        mm.apply(_tiny(), mm.QuantConfig(**{argument: ("dw", "nope")}))


def test_subclassed_model_raises():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = L.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    model = Subclassed()
    model(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="Received: model=Subclassed"):
        mm.apply(model)


@pytest.mark.parametrize("bad", [dict(model="not a model"), dict(config={"bits": 4})])
def test_bad_arguments_raise(bad):
    arguments = dict(model=_tiny(), config=None) | bad
    with pytest.raises(ValueError, match="Received:"):
        mm.apply(arguments["model"], arguments["config"])


def test_unsupported_layer_is_left_float_and_reported():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.Conv2DTranspose(4, 3, name="sep")(x)
    x = L.GlobalAveragePooling2D()(x)
    original = keras.Model(inp, L.Dense(2, name="fc")(x))
    model = mm.apply(original)
    assert type(model.get_layer("sep")) is L.Conv2DTranspose
    assert [layer.name for layer in mm.quant_layers(model)] == ["conv", "fc"]
    assert wrap.unsupported_layers(model) == ["sep"]
    cost = CostModel(model)
    assert cost.report()["unsupported_float_layers"] == ["sep"]
    assert "left in float (unsupported): sep" in cost.format_report()
    x = images(2)[:, :8, :8]
    np.testing.assert_array_equal(model(x).numpy(), original(x).numpy())


def test_sequential_model():
    original = keras.Sequential([
        keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="c1"), L.ReLU(), L.DepthwiseConv2D(3),
        L.ReLU(), L.Flatten(), L.Dense(2, name="out")], name="seq")
    model = mm.apply(original)
    assert len(mm.quant_layers(model)) == 3
    assert not model.get_layer("out").input_quantizer.signed
    x = images(2)[:, :8, :8]
    np.testing.assert_array_equal(model(x).numpy(), original(x).numpy())
    mm.calibrate(model, x)
    mm.set_uniform(model, 8)
    assert np.isfinite(model(x).numpy()).all()


# -- modes, bits, groups ---------------------------------------------------------------------
def test_variable_groups_partition():
    model = mm.apply(_tiny(), mm.QuantConfig(candidate_bits=(2, 4, 8)))
    groups = assert_partition(model)
    assert [a.path for a in groups.alphas] == ["dw/dw_aq/alpha", "pw/pw_aq/alpha"]
    # 4 input and 4 weight quantizers; 3 output quantizers (pooling input and output, logits)
    assert all("step_size" in v.path for v in groups.steps) and len(groups.steps) == 11
    assert not any("step_size" in v.path or "alpha" in v.path for v in groups.weights)
    assert groups.weights_and_steps == groups.weights + groups.steps


def test_set_mode_set_uniform_and_select_bits():
    model = mm.apply(_tiny(), mm.QuantConfig(candidate_bits=(2, 4, 8)))
    mm.set_mode(model, "mixture")
    assert {q.mode for q in mm.activation_quantizers(model)} == {"mixture"}
    with pytest.raises(ValueError, match="Received: mode='fast'"):
        mm.set_mode(model, "fast")

    mm.set_uniform(model, 4)
    for q in mm.activation_quantizers(model):
        assert q.mode == "uniform"
        assert q.candidate_bits[q.uniform_index] == (4 if q.searchable else 8)
    with pytest.raises(ValueError, match="Received: bits=5"):
        mm.set_uniform(model, 5)

    model.get_layer("pw").input_quantizer.alpha.assign([0.0, 0.0, 1.0])
    selected = mm.select_bits(model, {"dw": 2})
    assert selected == {"conv1": 8, "dw": 2, "pw": 8, "fc": 8}  # pw: argmax alpha
    assert mm.get_bits(model) == selected
    assert {q.mode for q in mm.activation_quantizers(model)} == {"selected"}
    with pytest.raises(ValueError, match=r"Received: bits keys=\['nope'\]"):
        mm.select_bits(model, {"nope": 4})
    with pytest.raises(ValueError, match="Received: bits=3"):
        mm.select_bits(model, {"dw": 3})


def test_calibrate_restores_modes_and_initialises_every_quantizer():
    model = mm.apply(_tiny())
    mm.set_mode(model, "mixture")
    x = images(4)[:, :8, :8]
    mm.calibrate(model, x)
    for q in mm.activation_quantizers(model):
        assert q.mode == "mixture" and q.initialized.numpy() == 1.0
        assert np.all(q.step_size.numpy() != 1.0)


def test_enable_weight_quantization_initialises_once():
    original = _tiny()
    model = mm.apply(original)
    wq = model.get_layer("pw").kernel_quantizer
    kernel = model.get_layer("pw").kernel.numpy()
    mm.enable_weight_quantization(model)
    assert wq.enabled
    np.testing.assert_allclose(wq.step_size.numpy(),
                               2 * np.abs(kernel).mean(axis=(0, 1, 2)) / np.sqrt(7), rtol=1e-5)
    x = images(2)[:, :8, :8]
    assert not np.array_equal(model(x).numpy(), original(x).numpy())
    wq.step_size.assign(wq.step_size * 2.0)  # "learned"
    learned = wq.step_size.numpy()
    mm.enable_weight_quantization(model)  # already on: keeps the learned steps
    np.testing.assert_array_equal(wq.step_size.numpy(), learned)
    mm.enable_weight_quantization(model, False)
    assert not any(w.enabled for w in mm.weight_quantizers(model))
    np.testing.assert_array_equal(model(x).numpy(), original(x).numpy())


# -- output quantizers ------------------------------------------------------------------------
def _residual(name="residual"):
    inp = keras.Input((32, 32, 3))
    a = L.Conv2D(8, 3, padding="same", activation="relu", name="a")(inp)
    b = L.BatchNormalization(name="b_bn")(L.Conv2D(8, 1, use_bias=False, name="b")(a))
    s = L.Add(name="add")([a, b])  # a: read by conv b and the add; b_bn: by the add only
    c = L.ReLU(6.0, name="c_relu")(L.Conv2D(8, 1, name="c")(s))  # fused relu: not stored
    x = L.GlobalAveragePooling2D(name="gap")(L.Dropout(0.1, name="drop")(c))
    return keras.Model(inp, L.Dense(3, name="fc")(x), name=name)


def test_output_quantizers_on_tensors_no_quantized_layer_reads():
    model = _residual()
    wrapped = mm.apply(model, mm.QuantConfig(output_bits=8))
    quantizers = {q.name: q for q in mm.output_quantizers(wrapped)}
    # a (relu, unsigned) feeds the add; b_bn feeds the add; c_relu feeds pooling through
    # dropout; the pooled output gets its own grid (TFLite cannot clamp it); fc is the model
    # output. The add only feeds conv c: its grid is c's input.
    assert {n: q.signed for n, q in quantizers.items()} == {
        "a_oq": False, "b_bn_oq": True, "c_relu_oq": False, "gap_oq": False, "fc_oq": True}
    assert all(q.candidate_bits == (8,) and not q.searchable for q in quantizers.values())
    x = images(4)
    np.testing.assert_array_equal(wrapped(x).numpy(), model(x).numpy())  # float mode
    assert set(mm.activation_quantizers(wrapped)) >= set(quantizers.values())
    assert not mm.output_quantizers(mm.apply(model, mm.QuantConfig(output_bits=None)))

    mm.calibrate(wrapped, x)
    mm.set_mode(wrapped, "selected")
    out = wrapped(x).numpy()
    step = quantizers["fc_oq"].selected_step
    np.testing.assert_allclose(out / step, np.round(out / step), atol=1e-4)  # on its grid
    assert_partition(wrapped)
    reloaded = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapped))
    reloaded.set_weights(wrapped.get_weights())
    mm.set_mode(reloaded, "selected")
    np.testing.assert_array_equal(reloaded(x).numpy(), out)


def test_output_bits_must_be_a_valid_bit_width():
    with pytest.raises(ValueError, match="output_bits"):
        mm.QuantConfig(output_bits=1)


def test_separable_conv_is_quantized_as_depthwise_and_pointwise():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.SeparableConv2D(4, 3, name="sep")(x)
    original = keras.Model(inp, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x)))
    model = mm.apply(original)
    assert [layer.name for layer in mm.quant_layers(model)] == [
        "conv", "sep_depthwise", "sep", "fc"]
    assert not wrap.unsupported_layers(model)
    x = images(2)[:, :8, :8]
    np.testing.assert_allclose(model(x).numpy(), original(x).numpy(), rtol=1e-5, atol=1e-6)


def test_adds_become_quant_adds_that_add_as_the_int8_kernel_with_kernel_rounding():
    """apply() puts a QuantAdd in place of each Add: the float sum until the export sets its
    kernel rounding, then (inference, inputs on their grids) the int8 ADD kernel's sum,
    which differs from rounding the float32 sum on 32 of the 65,536 input pairs here."""
    from metamix_tf.export import kernels
    from metamix_tf.quant.layers import QuantAdd

    a, b = keras.Input((256,)), keras.Input((256,))
    wrapped = mm.apply(keras.Model([a, b], L.Add(name="sum")([a, b])))
    layer = wrapped.get_layer("sum")
    assert type(layer) is QuantAdd and layer.kernel_rounding is None
    s_a, s_b, s_out = (float(np.float32(v)) for v in (0.1908, 0.0761, 0.0962))
    q_a, q_b = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij")
    x = [(q_a * s_a).astype(np.float32), (q_b * s_b).astype(np.float32)]
    float_sum = layer(x).numpy()
    params = kernels.add_params(s_a, s_b, s_out)
    layer.kernel_rounding = {"steps": [s_a, s_b], "shift": params.shift, "output_step": s_out,
                             "multipliers": [params.multiplier_a, params.multiplier_b]}
    expected = kernels.add(q_a, q_b, (0, 0, 0), params, (-(2 ** 30), 2 ** 30))
    np.testing.assert_array_equal(np.round(layer(x).numpy() / np.float32(s_out)), expected)
    assert (np.round(float_sum / np.float32(s_out)) != expected).sum() == 32
    np.testing.assert_array_equal(layer(x, training=True).numpy(), float_sum)
    off_grid = [x[0] + np.float32(0.3 * s_a), x[1]]
    np.testing.assert_array_equal(layer(off_grid).numpy(), layer(off_grid, training=True).numpy())
    clone = QuantAdd.from_config(layer.get_config())
    assert clone.kernel_rounding == layer.kernel_rounding
