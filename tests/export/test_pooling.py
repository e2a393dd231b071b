"""'same' padded average pooling in the int8 export (``metamix_tf.export.pooling``): the
window runs against TensorFlow's own pooling, and InceptionV3's pattern (a concatenation
read by a 'same' average pooling read by a conv) exported with the Keras model's integers.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import metamix_tf as mm
from metamix_tf.export import families, pool_steps, pooling

L = keras.layers


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("pool, stride", [(1, 1), (2, 1), (3, 1), (3, 2), (2, 2), (5, 3)])
def test_axis_runs_are_tf_same_pooling(size, pool, stride):
    runs = pooling.axis_runs(size, pool, stride)
    x = np.random.default_rng(size).normal(size=(1, size, 1, 1)).astype(np.float32)
    reference = tf.nn.avg_pool2d(x, (pool, 1), (stride, 1), "SAME").numpy().ravel()
    pieces = [tf.nn.avg_pool2d(x[:, r.start:r.stop], (r.length, 1), (stride, 1), "VALID")
              for r in runs]
    assert [r.outputs for r in runs] == [p.shape[1] for p in pieces]
    assert [r.first for r in runs] == list(np.cumsum([0] + [r.outputs for r in runs])[:-1])
    np.testing.assert_allclose(np.concatenate([p.numpy().ravel() for p in pieces]),
                               reference, rtol=1e-6)


def test_window_counts_of_inception_sizes():
    assert pooling.window_counts(7, 7, (3, 3), (1, 1)) == [4, 6, 9]
    assert pooling.counts_lcm(7, 7, (3, 3), (1, 1)) == 36
    assert pooling.window_counts(1, 1, (3, 3), (1, 1)) == [1]  # the pool of a 1x1 map
    assert pooling.window_counts(7, 7, (3, 3), (2, 2)) == [4, 6, 9]
    assert pooling.window_counts(4, 4, (2, 2), (2, 2)) == [4]  # no padding: one 'valid' run


def _inception_block() -> keras.Model:
    """InceptionV3's mixed block at 7x7: a max pooling read by two convs and a 'same'
    average pooling, the pooling read by a conv, the concatenation read by a strided 'same'
    average pooling."""
    inp = keras.Input((15, 15, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(scale=False, name="stem_bn")(x)
    x = L.Activation("relu", name="stem_relu")(x)
    x = L.MaxPooling2D(3, strides=1, padding="same", name="stem_pool")(x)
    branches = []
    for name, k, source in (("b1", 1, x), ("b3", 3, x),
                            ("bp", 1, L.AveragePooling2D(3, strides=1, padding="same",
                                                         name="pool_same")(x))):
        y = L.Conv2D(8, k, padding="same", use_bias=False, name=name)(source)
        y = L.BatchNormalization(scale=False, name=f"{name}_bn")(y)
        branches.append(L.Activation("relu", name=f"{name}_relu")(y))
    x = L.Concatenate(name="mixed")(branches)
    x = L.AveragePooling2D(3, strides=2, padding="same", name="pool_strided")(x)
    x = L.Conv2D(8, 1, activation="relu", name="head")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="inception_block")


def test_same_average_pooling_has_an_output_quantizer_off_ties():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(-1, 1, (32, 15, 15, 3)).astype(np.float32)
    model = _inception_block()
    families.set_batch_norm_statistics(model, images)
    wrapped = mm.apply(model, mm.QuantConfig())
    assert {"pool_same_oq", "pool_strided_oq"} <= {q.name for q in mm.output_quantizers(wrapped)}
    mm.calibrate(wrapped, images)
    mm.select_bits(wrapped)
    mm.enable_weight_quantization(wrapped)
    source = wrapped.get_layer("stem_relu_oq").selected_step
    changed = pool_steps.snap_pooled_steps(wrapped)
    assert "pool_same_oq" in changed
    ratio = wrapped.get_layer("pool_same_oq").selected_step * 36 / source  # lcm(4, 6, 9)
    assert ratio == pytest.approx(round(ratio), abs=1e-4) and round(ratio) % 2 == 1


def test_inception_block_exports_with_the_keras_integers(tmp_path):
    """Before: TFLite's AVERAGE_POOL_2D rounded the mean onto its input's scale and the conv
    requantized it (two roundings, Keras had one): 'bp' read other integers than Keras."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (96, 15, 15, 3)).astype(np.float32)
    wrapped, _ = families.quantize_at_random(_inception_block(), images[:32], seed=0)
    report = families.export_quantized(wrapped, "inception_block", images[:32], images[32:],
                                       str(tmp_path))
    v = report["verification"]
    assert "AVERAGE_POOL_2D" not in report["graphs"]["int8"]["ops"]
    assert report["graphs"]["int8"]["float_ops"] == []
    assert v["grid_check"]["all_on_grid"]
    layers = {c["layer"]: c for c in v["grid_check"]["layers"]}
    assert layers["bp"]["match_keras"] == 1.0 and layers["head"]["match_keras"] == 1.0
    assert v["tflite"]["int8"]["top1_agreement"] == 1.0
