"""ConvNeXt's parts in apply() and the int8 export: the channel-wise grouped conv becomes a
depthwise conv, LayerScale folds into the dense before it, and LayerNormalization / GELU
stay float islands between int8 tensors (``graph_rules.FLOAT_ISLANDS``), listed in the
report."""

from __future__ import annotations

import keras
import numpy as np
from keras.src.applications.convnext import LayerScale

import metamix_tf as mm
from metamix_tf.export import families
from metamix_tf.quant import canonical, graph_rules, wrap

L = keras.layers


def _convnext_block() -> keras.Model:
    """A ConvNeXt stem (a nested Sequential), one block and the head, at 16x16."""
    inp = keras.Input((16, 16, 3), name="image")
    stem = keras.Sequential([L.Conv2D(8, 4, strides=4, name="stem_conv"),
                             L.LayerNormalization(epsilon=1e-6, name="stem_ln")], name="stem")
    x = stem(inp)
    y = L.Conv2D(8, 7, padding="same", groups=8, name="dw")(x)
    y = L.LayerNormalization(epsilon=1e-6, name="ln")(y)
    y = L.Dense(32, name="pw1")(y)
    y = L.Activation("gelu", name="gelu")(y)
    y = L.Dense(8, name="pw2")(y)
    y = LayerScale(0.5, 8, name="layer_scale")(y)
    x = x + y
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="convnext_block")


def _with_random_scales(model: keras.Model) -> keras.Model:
    rng = np.random.default_rng(0)
    scale = model.get_layer("layer_scale")
    scale.gamma.assign(rng.uniform(0.5, 2.0, 8).astype(np.float32))
    return model


def test_canonical_form_has_a_depthwise_conv_and_no_layer_scale():
    keras.utils.set_random_seed(0)
    model = _with_random_scales(_convnext_block())
    new = canonical.canonicalize(model)
    assert isinstance(new.get_layer("dw"), L.DepthwiseConv2D)
    assert not any(isinstance(layer, LayerScale) for layer in new.layers)
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(new(x), model(x), rtol=1e-4, atol=1e-4)


def test_float_islands_store_their_inputs():
    assert graph_rules.is_float_island(L.LayerNormalization())
    assert graph_rules.is_float_island(L.Activation("gelu"))
    assert not graph_rules.is_float_island(L.Activation("relu"))
    assert graph_rules.stores(L.Dense(4), L.Activation("gelu"), 1)
    wrapped = mm.apply(_convnext_block(), mm.QuantConfig())
    oq = {q.name for q in mm.output_quantizers(wrapped)}
    assert {"stem_conv_oq", "dw_oq", "pw1_oq"} <= oq  # read by a LayerNorm or the GELU
    assert wrap.unsupported_layers(wrapped) == []


def test_convnext_block_exports_with_its_float_islands_listed(tmp_path):
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).normal(size=(96, 16, 16, 3)).astype(np.float32)
    wrapped, _ = families.quantize_at_random(_with_random_scales(_convnext_block()),
                                             images[:32])
    report = families.export_quantized(wrapped, "convnext_block", images[:32], images[32:],
                                       str(tmp_path))
    v = report["verification"]
    assert report["float_layers"] == []
    assert sorted(report["float_islands"]) == ["gelu", "head_ln", "ln", "stem_ln"]
    assert report["graphs"]["int8"]["float_ops"]  # the islands, in float
    assert v["grid_check"]["all_on_grid"]
    # measured 87.5% (56/64): the converter runs the LayerNorms' first MEAN as an int8 op on
    # its input's scale (the islands' other ops stay float); the Keras graphs agree 100%
    assert v["tflite"]["int8"]["top1_agreement"] >= 0.8


def test_identical_activations_of_one_tensor_become_one():
    """NASNet applies ``relu`` to a cell input once per branch; the converter merges those
    into one op that no single int8 grid fits, so the canonical form merges them first."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="stem")(inp)
    a = L.Conv2D(4, 1, name="left")(L.Activation("relu", name="relu_a")(x))
    b = L.Conv2D(4, 1, name="right")(L.Activation("relu", name="relu_b")(x))
    model = keras.Model(inp, L.Add(name="add")([a, b]))
    new = canonical.canonicalize(model)
    kept = {layer.name for layer in new.layers} & {"relu_a", "relu_b"}
    assert len(kept) == 1
    image = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(new(image), model(image), rtol=1e-6, atol=1e-6)
    wrapped = mm.apply(model, mm.QuantConfig())
    assert f"{kept.pop()}_oq" in {q.name for q in mm.output_quantizers(wrapped)}  # 2 readers
