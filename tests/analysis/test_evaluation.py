"""BatchNorm re-estimation at fixed bits and per-image predictions
(metamix_tf.analysis.evaluation)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CANDIDATES, random_batch, tiny_net

from metamix_tf.analysis import evaluation, stability
from metamix_tf.config import QuantConfig
from metamix_tf.quant import wrap


def _model(batch):
    model = wrap.apply(tiny_net(), QuantConfig(candidate_bits=CANDIDATES))
    wrap.calibrate(model, batch[0])
    names = [layer.name for layer in wrap.quant_layers(model)
             if layer.input_quantizer is not None and layer.input_quantizer.searchable]
    bits = {name: CANDIDATES[i % len(CANDIDATES)] for i, name in enumerate(names)}
    return model, {**wrap.get_bits(model), **bits}


def test_after_one_batch_inference_equals_training_mode_on_that_batch():
    """Moving statistics = that batch's statistics at every layer, at the given bits."""
    batch = random_batch(n=16, seed=1)
    model, bits = _model(batch)
    kernels = {w.path: np.array(w) for w in model.trainable_weights}
    assert evaluation.reestimate_batch_norm(model, [batch] * 3, bits=bits,
                                            num_batches=1) == 1
    assert wrap.get_bits(model) == bits  # left in "selected" mode at the bits
    inference = keras.ops.convert_to_numpy(model(batch[0], training=False))
    for bn in evaluation.batch_norm_layers(model):
        assert bn.momentum == 0.99  # restored
        bn.momentum = 1.0  # the training-mode reference call must not move them
    training = keras.ops.convert_to_numpy(model(batch[0], training=True))
    # float32: the same statistics computed in two graphs, a few ulps apart
    np.testing.assert_allclose(inference, training, rtol=1e-4, atol=1e-4)
    after = {w.path: np.array(w) for w in model.trainable_weights}
    assert kernels and all(np.array_equal(kernels[k], after[k]) for k in kernels)


def test_moving_statistics_average_the_batches():
    """The first BatchNorm's input depends on no other BatchNorm: its moving mean and
    variance are the mean over batches of its batch statistics (the inference probe's)."""
    batches = [random_batch(n=16, seed=s) for s in (1, 2)]
    model, bits = _model(batches[0])
    evaluation.reestimate_batch_norm(model, batches, bits=bits, num_batches=2)
    probe = stability._Probe(model)
    per_batch = [stability._run_statistics(model, probe, images.numpy(), bits, None)["bn0"]
                 for images, _ in batches]
    bn0 = model.get_layer("bn0")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn0.moving_mean),
                               np.mean([e["bn_mean_channels"] for e in per_batch], axis=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn0.moving_variance),
                               np.mean([e["bn_var_channels"] for e in per_batch], axis=0),
                               rtol=1e-5, atol=1e-6)


def test_predictions_are_the_argmax_of_the_model_at_its_bits():
    images, labels = random_batch(n=24, seed=3)
    model, bits = _model((images, labels))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(10)
    predicted, got_labels = evaluation.predictions(model, dataset, bits=bits)
    wrap.select_bits(model, bits)
    expected = np.argmax(keras.ops.convert_to_numpy(model(images, training=False)), axis=-1)
    np.testing.assert_array_equal(predicted, expected)
    np.testing.assert_array_equal(got_labels, labels.numpy())


def test_bad_batch_count():
    batch = random_batch()
    model, _ = _model(batch)
    with pytest.raises(ValueError, match="num_batches"):
        evaluation.reestimate_batch_norm(model, [batch], num_batches=0)
