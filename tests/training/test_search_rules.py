"""Tests for the search settings of issue 12: cost normalisation, coupled L2 in
make_optimizer, the alpha learning-rate rule and the initial tie-break of the alphas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from metamix_tf import config as config_lib
from metamix_tf.training import losses, optimizers, search_rules

# Cost normalisation

def test_cost_penalty_absolute_and_relative():
    g = tf.constant(6.0)
    assert float(losses.cost_penalty(g, 5.0, 4.0)) == pytest.approx(0.8)
    assert float(losses.cost_penalty(g, 5.0, 4.0, "relative")) == pytest.approx(0.8)
    assert float(losses.cost_penalty(g, 5.0, 4.0, "absolute")) == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"Received: normalization='l1'"):
        losses.cost_penalty(g, 5.0, 4.0, "l1")


@pytest.mark.parametrize("normalization", ["relative", "absolute"])
def test_relative_cost_weight_reproduces_each_form(normalization):
    target = 5.12
    weight = search_rules.relative_cost_weight(4.0, target, normalization)
    for g in (3.0, 5.12, 7.5):
        expected = losses.cost_penalty(tf.constant(g), target, 4.0, normalization)
        got = losses.cost_penalty(tf.constant(g), target, weight)  # the relative form
        assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert search_rules.relative_cost_weight(4.0, target, "absolute") / 4.0 == \
        pytest.approx(5.12)  # the paper's lambda = 4 is 5.1x the relative lambda = 4
    with pytest.raises(ValueError, match=r"Received: cost_normalization='l2'"):
        search_rules.relative_cost_weight(4.0, target, "l2")


def test_search_config_checks_the_new_options():
    config = config_lib.load([], {"search": {"cost_normalization": "absolute",
                                             "alpha_lr_rule": "displacement"}})
    assert config.search.cost_normalization == "absolute"
    assert config.search.alpha_displacement == 0.5
    with pytest.raises(ValueError, match=r"Received: cost_normalization='abs'"):
        config_lib.load([], {"search": {"cost_normalization": "abs"}})
    with pytest.raises(ValueError, match=r"Received: alpha_lr_rule='auto'"):
        config_lib.load([], {"search": {"alpha_lr_rule": "auto"}})
    with pytest.raises(ValueError, match=r"Received: optimizer='rmsprop'"):
        config_lib.load([], {"pretrain": {"optimizer": "rmsprop"}})


def test_imagenet_config_is_the_papers_setting():
    config = config_lib.load(["configs/imagenet_mobilenet_v2.yaml"])
    s = config.search
    assert (s.cost_normalization, s.cost_weight) == ("absolute", 4.0)
    assert (s.alpha_learning_rate, s.alpha_beta_1, s.alpha_beta_2) == (1e-4, 0.5, 0.999)
    assert (s.alpha_l2, s.alpha_weight_decay, s.alpha_lr_rule) == (1e-3, 0.0, "fixed")


# Coupled L2

def _one_step(l2, kind, weight_decay=0.0, no_decay=False):
    v = keras.Variable(np.array([1.0, -2.0], np.float32))
    opt = optimizers.make_optimizer(0.1, [v], l2=l2, kind=kind, weight_decay=weight_decay,
                                 momentum=0.0, nesterov=False,
                                 no_decay=[v] if no_decay else ())
    opt.apply_gradients([(tf.constant([0.5, 0.5]), v)])
    return keras.ops.convert_to_numpy(v)


def test_coupled_l2_is_added_to_the_gradient():
    # SGD: v - lr * (g + l2 * v)
    np.testing.assert_allclose(_one_step(0.1, "sgd"), [1 - 0.1 * (0.5 + 0.1),
                                                        -2 - 0.1 * (0.5 - 0.2)], rtol=1e-6)
    np.testing.assert_allclose(_one_step(0.0, "sgd"), [0.95, -2.05], rtol=1e-6)
    # no_decay variables get no L2
    np.testing.assert_allclose(_one_step(0.1, "sgd", no_decay=True), [0.95, -2.05],
                               rtol=1e-6)
    # Adam normalises g + l2 * v: with g + l2 * v = 0 the first step does not move v.
    v = keras.Variable(np.array([1.0], np.float32))
    opt = optimizers.make_optimizer(0.1, [v], l2=0.5)
    opt.apply_gradients([(tf.constant([-0.5]), v)])
    assert float(v.numpy()[0]) == pytest.approx(1.0, abs=1e-6)
    # Keras' decoupled weight_decay is v -= lr * wd * v, independent of the gradient.
    np.testing.assert_allclose(_one_step(0.0, "sgd", weight_decay=0.1),
                               [1 - 0.01 - 0.05, -2 + 0.02 - 0.05], rtol=1e-6)


def test_coupled_l2_under_tf_function_and_checkpoint(tmp_path):
    v = keras.Variable(np.ones(3, np.float32))
    opt = optimizers.make_optimizer(0.1, [v], l2=1e-3, kind="sgd")

    @tf.function
    def step():
        opt.apply_gradients([(tf.ones(3), v)])

    step()
    path = tf.train.Checkpoint(optimizer=opt, v=v).save(str(tmp_path / "ckpt"))
    assert path
    with pytest.raises(ValueError, match=r"Received: kind='lamb'"):
        optimizers.make_optimizer(0.1, [v], kind="lamb")
    with pytest.raises(ValueError, match=r"Received: l2=-1"):
        optimizers.make_optimizer(0.1, [v], l2=-1)


# Alpha learning rate

def test_alpha_steps_and_displacement_rule():
    assert search_rules.alpha_steps("metamix", 2, 1, 5004) == 5004
    assert search_rules.alpha_steps("metamix", 2, 2, 100) == 100  # warm-up cut to 1 epoch
    assert search_rules.alpha_steps("joint", 2, 1, 100) == 200
    assert search_rules.alpha_steps("none", 2, 1, 100) == 0
    # The paper: lr 1e-4 over ~5,000 bit-search steps is a displacement of ~0.5.
    lr = search_rules.alpha_learning_rate("displacement", 5e-2, 0.5, 5004)
    assert lr == pytest.approx(1e-4, rel=0.01)
    assert search_rules.alpha_learning_rate("fixed", 5e-2, 0.5, 5004) == 5e-2
    # Both searchers get the same displacement: lr x their own alpha steps.
    for searcher in ("metamix", "joint"):
        steps = search_rules.alpha_steps(searcher, 3, 1, 78)
        assert search_rules.alpha_learning_rate("displacement", 0, 0.5, steps) * steps == \
            pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"Received: steps=0"):
        search_rules.alpha_learning_rate("displacement", 0, 0.5, 0)
    with pytest.raises(ValueError, match=r"Received: searcher='dnas'"):
        search_rules.alpha_steps("dnas", 2, 1, 10)


# Initial tie-break

def test_tie_break_logits_pick_the_preferred_bits():
    logits = search_rules.tie_break_logits((2, 3, 4, 8), 4, 0.01)
    np.testing.assert_array_equal(logits, np.array([0, 0, 0.01, 0], np.float32))
    assert (2, 3, 4, 8)[int(np.argmax(logits))] == 4
    # The mixture stays almost uniform.
    probs = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(probs - 0.25).max() < 0.01
    assert (2, 3, 4, 8)[int(np.argmax(search_rules.tie_break_logits((2, 3, 4, 8), 4, 0.0)))] \
        == 2  # no bias: the old tie to the lowest bits
    with pytest.raises(ValueError, match=r"Received: preferred_bits=5"):
        search_rules.tie_break_logits((2, 3, 4, 8), 5, 0.01)


def test_set_initial_alphas_on_a_wrapped_model():
    from metamix_tf.quant import wrap

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="fc")(x)
    model = wrap.apply(keras.Model(inputs, outputs), config_lib.QuantConfig())
    count = search_rules.set_initial_alphas(model, 4, 0.01)
    assert count >= 1
    searchable = [layer.input_quantizer for layer in wrap.quant_layers(model)
                  if layer.input_quantizer is not None and layer.input_quantizer.searchable]
    assert len(searchable) == count
    assert {q.argmax_bits for q in searchable} == {4}


def test_coupled_l2_once_under_mirrored_strategy(two_cpu_strategy):
    """Two replicas: the L2 term is added once, to the replica-summed gradient."""
    with two_cpu_strategy.scope():
        v = keras.Variable(np.array([1.0, -2.0], np.float32))
        opt = optimizers.make_optimizer(0.1, [v], l2=0.1, kind="sgd", momentum=0.0,
                                     nesterov=False)

    @tf.function
    def step():
        def replica_fn():
            opt.apply_gradients([(tf.constant([0.25, 0.25]), v)])  # summed: 0.5
        two_cpu_strategy.run(replica_fn)

    step()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v),
                               [1 - 0.1 * (0.5 + 0.1), -2 - 0.1 * (0.5 - 0.2)], rtol=1e-6)
