"""Tests for precision.float64_copy: the wrapped Keras model computing in float64."""

import keras
import numpy as np
import pytest

import metamix_tf as mm
from metamix_tf.export import precision

L = keras.layers


def _wrapped(bits: int):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 3, use_bias=False)(x)  # the searchable one (first and last stay 8-bit)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(5)(x))
    wrapped = mm.apply(model, mm.QuantConfig())
    images = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    mm.calibrate(wrapped, images)
    searchable = {layer.name: bits for layer in mm.quant_layers(wrapped)
                  if layer.input_quantizer.searchable}
    assert len(searchable) == 1
    mm.select_bits(wrapped, searchable)
    mm.enable_weight_quantization(wrapped)
    return wrapped, images


def test_copy_computes_in_float64_with_the_same_variables_and_modes():
    wrapped, images = _wrapped(bits=2)
    copy = precision.float64_copy(wrapped)
    assert {v.dtype for v in copy.weights} <= {"float64", "int32", "int64", "bool"}
    for source, target in zip(wrapped.weights, copy.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(target),
                                      keras.ops.convert_to_numpy(source))
    exact = precision.float64_logits(wrapped, images)
    assert exact.dtype == np.float64
    float32 = keras.ops.convert_to_numpy(wrapped(images, training=False))
    # Same 2-bit selection (a lost mode would move the logits by whole steps); the float32
    # and float64 evaluations differ by float32 rounding, unless a value sits at a tie.
    np.testing.assert_allclose(exact, float32, rtol=0, atol=1e-4 * np.abs(float32).max())
    other = precision.float64_logits(_wrapped(bits=8)[0], images)
    assert np.abs(other - exact).max() > 1e-2


def test_a_layer_that_fixes_its_dtype_or_cannot_be_rebuilt_is_refused():
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(2, dtype="float32")(L.Dense(3)(inp)))
    # both Dense layers follow the rewritten policy; a variable created in float32 by
    # hand would not
    copy = precision.float64_copy(model)
    assert {v.dtype for v in copy.weights} == {"float64"}

    @keras.saving.register_keras_serializable(package="test_precision")
    class Fixed(L.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), dtype="float32")

        def call(self, x):
            return x * keras.ops.cast(self.w, x.dtype)

    fixed = keras.Model(inp, Fixed()(inp))
    with pytest.raises(ValueError, match="still holds float32 variables"):
        precision.float64_copy(fixed)

    class Unregistered(L.Layer):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="cannot be rebuilt from its config in float64"):
        precision.float64_copy(keras.Model(inp, Unregistered()(inp)))
