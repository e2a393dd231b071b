"""MetaMix's fixed-meta-state ablation option (issue 12): the bit-search step steps the
weights only with ``update_weights_in_search``."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_steps import CANDIDATES, build, calibrated, changed, random_batch, snapshot

import metamix_tf
from metamix_tf.quant.cost import CostModel
from metamix_tf.training import searchers


@pytest.mark.parametrize("update", [False, True])
def test_bit_search_step_steps_the_weights_only_in_the_ablation(update):
    strategy = tf.distribute.get_strategy()
    model, groups, _, alpha_opt = build(strategy)
    with strategy.scope():
        # the bit-meta step's optimizer has lr 0: any weight change comes from the bit step
        meta_opt, search_opt = keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.05)
        meta_opt.build(groups.weights_and_steps)
        search_opt.build(groups.weights_and_steps)
    batch = random_batch()
    calibrated(strategy, model, batch)
    cost = CostModel(model)
    setup = searchers.SearchSetup(
        strategy=strategy, model=model, groups=groups, cost=cost, target=cost.uniform_gbops(4),
        candidate_bits=CANDIDATES, uniform_bits=4, weight_optimizer=meta_opt,
        alpha_optimizer=alpha_opt, cost_weight=4.0, step_kwargs={},
        search_weight_optimizer=search_opt if update else None)
    searcher = searchers.MetaMix(warmup_epochs=0, update_weights_in_search=update)
    assert searcher.searched(0)
    weights, alphas = snapshot(groups.weights), snapshot(groups.alphas)
    searcher.make_epoch_step(setup)(0)(*batch)
    assert all(changed(alphas, groups.alphas))
    assert changed(weights, groups.weights) == [update] * len(weights)


def test_ablation_needs_its_optimizer_and_counts_its_steps():
    searcher = searchers.MetaMix(warmup_epochs=1, update_weights_in_search=True)
    assert searcher.search_weight_steps(epochs=3, steps_per_epoch=10) == 20
    assert searchers.MetaMix(1).search_weight_steps(epochs=3, steps_per_epoch=10) == 0
    strategy = tf.distribute.get_strategy()
    model, groups, weight_opt, alpha_opt = build(strategy)
    cost = CostModel(model)
    setup = searchers.SearchSetup(
        strategy=strategy, model=model, groups=groups, cost=cost, target=cost.uniform_gbops(4),
        candidate_bits=CANDIDATES, uniform_bits=4, weight_optimizer=weight_opt,
        alpha_optimizer=alpha_opt, cost_weight=4.0, step_kwargs={})
    with pytest.raises(ValueError, match="search_weight_optimizer"):
        searcher.make_epoch_step(setup)


def test_search_runs_the_ablation_end_to_end():
    from helpers import tiny_net

    x, y = (np.asarray(t) for t in random_batch(n=16))
    qmodel = metamix_tf.apply(tiny_net(), metamix_tf.QuantConfig(candidate_bits=CANDIDATES))
    result = metamix_tf.search(
        qmodel, (x, y), target_avg_bits=4, epochs=1, warmup_epochs=0, batch_size=8,
        searcher=searchers.MetaMix(0, update_weights_in_search=True), verbose=False)
    assert set(result.bits.values()) <= set(CANDIDATES)
    assert np.isfinite(result.history[-1]["loss"])
