"""Mode and bit switches act on Keras' compiled fit / evaluate / predict, and a wrapped
model trains with plain compile + fit without 'Gradients do not exist' warnings."""

import warnings

import keras
import numpy as np
import pytest
from helpers import three_conv_model

import metamix_tf as mm

L = keras.layers


def _model():
    return mm.apply(three_conv_model(head_name="fc"), mm.QuantConfig(candidate_bits=(2, 4, 8)))


def _data(n=16):
    rng = np.random.default_rng(0)
    return (rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32),
            rng.integers(0, 4, n).astype(np.int32))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _eager_loss(model, x, y):
    return float(LOSS(y, model(x, training=False)))


@pytest.mark.parametrize("switch", ["set_mode", "select_bits", "set_uniform",
                                    "enable_weight_quantization"])
def test_switch_after_evaluate_takes_effect(switch):
    model = _model()
    x, y = _data()
    mm.calibrate(model, x)
    mm.select_bits(model, {"c2": 2})
    model.compile(loss=LOSS)
    before = model.evaluate(x, y, batch_size=len(x), verbose=0)
    assert before == pytest.approx(_eager_loss(model, x, y), rel=1e-6)
    if switch == "set_mode":
        mm.set_mode(model, "float")
    elif switch == "select_bits":
        mm.select_bits(model, {"c2": 8})
    elif switch == "set_uniform":
        mm.set_uniform(model, 4)
    else:
        mm.enable_weight_quantization(model)
    after = model.evaluate(x, y, batch_size=len(x), verbose=0)
    assert after != pytest.approx(before, rel=1e-4)
    assert after == pytest.approx(_eager_loss(model, x, y), rel=1e-6)
    np.testing.assert_allclose(model.predict(x, batch_size=len(x), verbose=0),
                               model(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


MODE_TABLE = [  # mode -> (alphas trainable, activation step sizes trainable)
    ("float", False, False),
    ("calibrate", False, False),
    ("uniform", False, True),
    ("selected", False, True),
    ("mixture", True, True),
]


@pytest.mark.parametrize("mode,alphas,steps", MODE_TABLE)
def test_keras_trainable_flags_follow_the_mode(mode, alphas, steps):
    model = _model()
    mm.set_mode(model, mode)
    for q in mm.activation_quantizers(model):
        assert q.alpha.trainable == (alphas and q.searchable), q.name
        assert q.step_size.trainable == steps, q.name
    trainable = {id(v) for v in model.trainable_variables}
    assert all((id(q.alpha) in trainable) == (alphas and q.searchable)
               for q in mm.activation_quantizers(model))
    for wq in mm.weight_quantizers(model):
        assert not wq.step_size.trainable
    mm.enable_weight_quantization(model)
    assert all(wq.step_size.trainable for wq in mm.weight_quantizers(model))


def test_fit_in_selected_mode_warns_nothing_and_leaves_the_logits():
    model = _model()
    x, y = _data()
    mm.calibrate(model, x)
    mm.select_bits(model, {"c2": 4})
    mm.enable_weight_quantization(model)
    alphas = [q.alpha.numpy().copy() for q in mm.activation_quantizers(model)]
    steps = [q.step_size.numpy().copy() for q in mm.activation_quantizers(model)]
    kernel = model.get_layer("c2").kernel.numpy().copy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    messages = [str(w.message) for w in caught if "radient" in str(w.message)]
    assert messages == []
    for q, a in zip(mm.activation_quantizers(model), alphas, strict=True):
        np.testing.assert_array_equal(q.alpha.numpy(), a)
    assert not np.array_equal(model.get_layer("c2").kernel.numpy(), kernel)
    assert not np.array_equal(mm.activation_quantizers(model)[1].step_size.numpy(), steps[1])


def test_saved_model_keeps_its_weights_and_flags(tmp_path):
    model = _model()
    x, _ = _data()
    mm.calibrate(model, x)
    mm.select_bits(model, {"c2": 2})
    mm.enable_weight_quantization(model)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    assert not any(q.alpha.trainable for q in mm.activation_quantizers(loaded))
    assert all(wq.step_size.trainable for wq in mm.weight_quantizers(loaded))
