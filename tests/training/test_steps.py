"""Step functions: what each step changes, the GBOPs penalty, and replica invariance.

A tiny functional conv net (16x16x3 inputs, 5 quantized layers: first conv and classifier
fixed at 8 bits, 3 searchable) on random data keeps every test to a few seconds.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CANDIDATES, random_batch, tiny_net

from metamix_tf.config import QuantConfig
from metamix_tf.quant import ops, wrap
from metamix_tf.quant.cost import CostModel
from metamix_tf.training import distribute, losses, optimizers, steps, trainer


def build(strategy, float_model=None, weight_lr=1e-2, alpha_lr=1e-1, sgd=False):
    """Wrapped tiny net with its variable groups and optimizers, under ``strategy``."""
    float_model = float_model or tiny_net()
    with strategy.scope():
        model = wrap.apply(float_model, QuantConfig(candidate_bits=CANDIDATES))
        groups = wrap.variable_groups(model)
        if sgd:
            weight_opt = keras.optimizers.SGD(weight_lr)
            alpha_opt = keras.optimizers.SGD(alpha_lr)
            weight_opt.build(groups.weights_and_steps)
            alpha_opt.build(groups.alphas)
        else:
            weight_opt = optimizers.make_optimizer(weight_lr, groups.weights_and_steps)
            alpha_opt = optimizers.make_optimizer(alpha_lr, groups.alphas, beta_1=0.5,
                                               weight_decay=1e-3)
    return model, groups, weight_opt, alpha_opt


def snapshot(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def changed(before, variables):
    return [not np.array_equal(b, a) for b, a in zip(before, snapshot(variables), strict=True)]


def all_state(model):
    """Every variable of the model, trainable or not (BN moving statistics included)."""
    return list(model.weights)


def calibrated(strategy, model, batch):
    steps.make_calibrate_step(strategy, model)(*batch)


def count_traces(monkeypatch, model) -> list:
    """A list that grows by one each time ``model`` is called: in a ``tf.function``, once
    per trace."""
    traced = []
    call = model.call
    monkeypatch.setattr(model, "call", lambda *a, **k: traced.append(1) or call(*a, **k))
    return traced


def test_meta_step_changes_weights_and_step_sizes_not_alphas():
    strategy = tf.distribute.get_strategy()
    model, groups, weight_opt, _ = build(strategy)
    batch = random_batch()
    calibrated(strategy, model, batch)
    alphas, weights = snapshot(groups.alphas), snapshot(groups.weights)
    act_steps = [q.step_size for q in wrap.activation_quantizers(model, searchable_only=True)]
    before_steps = snapshot(act_steps)
    meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps, CANDIDATES)
    out = meta(*batch)
    assert np.isfinite(float(out["loss_sum"])) and float(out["count"]) == 16
    # each candidate's own loss is reported, and the step's loss is their mean
    per_bits = [float(out[f"meta{b}_loss_sum"]) for b in CANDIDATES]
    assert float(out["loss_sum"]) == pytest.approx(np.mean(per_bits), rel=1e-6)
    assert len(set(per_bits)) == len(CANDIDATES)  # the passes really ran at other bits
    metrics = trainer._epoch_metrics({k: float(v) for k, v in out.items()}, {})
    assert set(metrics["meta_losses"]) == {str(b) for b in CANDIDATES}
    assert metrics["meta_losses"]["2"] == pytest.approx(per_bits[0] / 16)
    assert not any(k.startswith("meta2") for k in metrics)
    assert not any(changed(alphas, groups.alphas))
    assert all(changed(weights, groups.weights))
    # Every branch of every searchable quantizer gets a step: one pass per candidate.
    for before, step in zip(before_steps, act_steps, strict=True):
        assert np.all(before != keras.ops.convert_to_numpy(step))


@pytest.mark.parametrize("meta_batch", ["full", "split"])
def test_meta_step_traces_one_pass_for_all_candidates_and_keeps_the_selection(meta_batch,
                                                                             monkeypatch):
    """The K passes share one traced forward/backward (tracing costs one pass, not K), each
    at its own bits (the losses differ), and the selected bits are as before the step."""
    strategy = tf.distribute.get_strategy()
    model, groups, weight_opt, _ = build(strategy)
    batch = random_batch()
    calibrated(strategy, model, batch)
    selected = wrap.select_bits(model, {
        layer.name: CANDIDATES[1] for layer in wrap.quant_layers(model)
        if layer.input_quantizer is not None and layer.input_quantizer.searchable})
    traced = count_traces(monkeypatch, model)
    meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                                CANDIDATES, meta_batch=meta_batch)
    out = meta(*batch)
    assert len(traced) == 1
    assert len({float(out[f"meta{b}_loss_sum"]) for b in CANDIDATES}) == len(CANDIDATES)
    assert wrap.get_bits(model) == selected
    meta(*batch)
    assert len(traced) == 1


def test_meta_step_on_drawn_candidates(monkeypatch):
    """``meta_candidates=n``: each step runs ``n`` distinct candidates drawn from the seed and
    the optimizer's step counter (the same draws when rebuilt), reports only those (count 0
    for the others) and averages their losses; over a few steps every candidate is drawn."""
    strategy = tf.distribute.get_strategy()
    batch = random_batch()
    float_model = tiny_net()
    runs = []
    for _ in range(2):
        model, groups, weight_opt, _ = build(strategy, float_model)
        calibrated(strategy, model, batch)
        traced = count_traces(monkeypatch, model)
        meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                                    CANDIDATES, meta_candidates=2, seed=7)
        outs = [{k: float(v) for k, v in meta(*batch).items()} for _ in range(4)]
        assert len(traced) == 1  # one traced pass for both drawn candidates
        runs.append(outs)
    assert runs[0] == runs[1]
    drawn = [[b for b in CANDIDATES if out[f"meta{b}_count"]] for out in runs[0]]
    assert all(len(d) == 2 for d in drawn)
    assert set().union(*map(set, drawn)) == set(CANDIDATES)
    for out, bits in zip(runs[0], drawn, strict=True):
        assert all(out[f"meta{b}_count"] == 16 for b in bits)
        mean = sum(out[f"meta{b}_loss_sum"] for b in bits) / 2
        assert out["loss_sum"] == pytest.approx(mean, rel=1e-6)
    split = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                                 CANDIDATES, meta_batch="split", meta_candidates=2)
    counts = [float(v) for k, v in split(*batch).items() if k.endswith("_count")]
    assert sorted(counts) == [0.0, 8.0, 8.0]  # two halves, each at a drawn candidate
    with pytest.raises(ValueError, match=r"meta_candidates` must be an integer in \[1, 3\]"):
        steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps, CANDIDATES,
                             meta_candidates=4)


def test_meta_step_on_one_drawn_candidate_is_a_train_step_at_its_bits():
    """With one candidate per step the bit-meta update is the plain training step with every
    searchable layer at the drawn bits: the same weights after it, bit for bit (SGD)."""
    strategy = tf.distribute.get_strategy()
    batch = random_batch()
    float_model = tiny_net()
    model, groups, weight_opt, _ = build(strategy, float_model, sgd=True)
    calibrated(strategy, model, batch)
    start = snapshot(all_state(model))
    meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                                CANDIDATES, meta_candidates=1, seed=3)
    out = {k: float(v) for k, v in meta(*batch).items()}
    (bits,) = [b for b in CANDIDATES if out[f"meta{b}_count"]]
    after_meta = snapshot(all_state(model))
    for variable, value in zip(all_state(model), start, strict=True):
        variable.assign(value)
    searchable = {layer.name: bits for layer in wrap.quant_layers(model)
                  if layer.input_quantizer is not None and layer.input_quantizer.searchable}
    selected = wrap.select_bits(model, searchable)
    wrap.set_mode(model, "selected")
    train = steps.make_train_step(strategy, model, weight_opt, groups.weights_and_steps,
                                  configure=lambda: wrap.set_mode(model, "selected"))
    train(*batch)
    assert wrap.get_bits(model) == selected
    for variable, a, b in zip(all_state(model), snapshot(all_state(model)), after_meta,
                              strict=True):
        if "bit_index" not in variable.path:  # the meta step restores the selection
            np.testing.assert_array_equal(a, b, err_msg=variable.path)


def test_split_meta_step_runs_under_xla():
    """The shared pass slices its part with bounds computed from a tensor: XLA still
    compiles it, and each part has its rows (16 = 5 + 5 + 6)."""
    strategy = tf.distribute.get_strategy()
    model, groups, weight_opt, _ = build(strategy)
    batch = random_batch()
    calibrated(strategy, model, batch)
    meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                                CANDIDATES, meta_batch="split", jit_compile=True)
    out = {k: float(v) for k, v in meta(*batch).items()}
    assert [out[f"meta{b}_count"] for b in CANDIDATES] == [5.0, 5.0, 6.0]
    assert all(np.isfinite(out[f"meta{b}_loss_sum"]) for b in CANDIDATES)


def test_evaluation_traces_once_for_every_batch_size(monkeypatch):
    """The eval set's last, partial batch (5 of 21 = 8 + 8 + 5) reuses the eval step's
    trace, and the result is the one of a per-batch reference."""
    strategy = tf.distribute.get_strategy()
    model, *_ = build(strategy)
    images, labels = random_batch(n=21)
    calibrated(strategy, model, (images[:16], labels[:16]))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    call = model.call
    traced = count_traces(monkeypatch, model)
    result = trainer.evaluate(strategy, steps.make_eval_step(strategy, model), dataset)
    assert len(traced) == 1
    logits = np.concatenate([keras.ops.convert_to_numpy(call(x, training=False))
                             for x, _ in dataset])
    assert result["val_acc"] == np.mean(np.argmax(logits, -1) == labels.numpy())


def test_search_step_changes_alphas_only():
    strategy = tf.distribute.get_strategy()
    model, groups, _, alpha_opt = build(strategy)
    batch = random_batch()
    calibrated(strategy, model, batch)
    cost = CostModel(model)
    alpha_ids = {id(a) for a in groups.alphas}
    others = [v for v in all_state(model) if id(v) not in alpha_ids]
    before_others, before_alphas = snapshot(others), snapshot(groups.alphas)
    search = steps.make_search_step(strategy, model, alpha_opt, groups.alphas, cost,
                                    cost.uniform_gbops(4), 4.0)
    out = search(*batch)
    assert set(out) >= {"loss_sum", "correct", "count", "penalty", "gbops"}
    assert all(changed(before_alphas, groups.alphas))
    # Weights, BN parameters, BN moving statistics, step sizes: all bit-identical.
    assert not any(changed(before_others, others))


def test_joint_step_changes_weights_and_alphas():
    strategy = tf.distribute.get_strategy()
    model, groups, weight_opt, alpha_opt = build(strategy)
    batch = random_batch()
    calibrated(strategy, model, batch)
    cost = CostModel(model)
    before_alphas, before_weights = snapshot(groups.alphas), snapshot(groups.weights)
    joint = steps.make_joint_step(strategy, model, weight_opt, groups.weights_and_steps, alpha_opt,
                                  groups.alphas, cost, cost.uniform_gbops(4), 4.0)
    joint(*batch)
    assert all(changed(before_alphas, groups.alphas))
    assert all(changed(before_weights, groups.weights))


@pytest.mark.parametrize("start_bits,target_bits", [(8, 2), (2, 8)])
def test_gbops_penalty_moves_bits_toward_target(start_bits, target_bits):
    """Starting from every layer at ``start_bits``, 15 search steps with a large lambda move
    the argmax GBOPs toward the target at ``target_bits``."""
    strategy = tf.distribute.get_strategy()
    model, groups, _, alpha_opt = build(strategy, alpha_lr=0.05)
    batch = random_batch()
    calibrated(strategy, model, batch)
    start = CANDIDATES.index(start_bits)
    for alpha in groups.alphas:
        alpha.assign(np.where(np.arange(len(CANDIDATES)) == start, 0.5, 0.0).astype(np.float32))
    cost = CostModel(model)
    target = cost.uniform_gbops(target_bits)
    before = cost.gbops(wrap.select_bits(model))
    search = steps.make_search_step(strategy, model, alpha_opt, groups.alphas, cost, target, 20.0)
    for _ in range(15):
        search(*batch)
    after = cost.gbops(wrap.select_bits(model))
    assert abs(after - target) < abs(before - target)
    assert abs(after - target) <= 0.5 * abs(before - target)


def test_train_step_trains_at_fixed_bits_like_selected_mode():
    """``fixed_bits`` (static branches) computes what "selected" mode does."""
    strategy = tf.distribute.get_strategy()
    model, _, _, _ = build(strategy)
    batch = random_batch()
    calibrated(strategy, model, batch)
    bits = {name: (8 if name in ("conv0", "logits") else b)
            for name, b in zip(["conv0", "dw1", "pw1", "conv3", "logits"], [8, 2, 4, 8, 8],
                               strict=True)}
    wrap.select_bits(model, bits)
    selected = keras.ops.convert_to_numpy(model(batch[0], training=False))
    steps.fixed_bits(model, bits)()
    fixed = keras.ops.convert_to_numpy(model(batch[0], training=False))
    np.testing.assert_array_equal(selected, fixed)
    with pytest.raises(ValueError, match="no entry"):
        steps.fixed_bits(model, {"conv0": 8})


def _run_all_steps(strategy, float_model, batches):
    """Calibration, 2 x (meta + search) and one joint step under ``strategy`` (SGD)."""
    model, groups, weight_opt, alpha_opt = build(strategy, float_model, weight_lr=0.05,
                                                 alpha_lr=0.5, sgd=True)
    distribute.sync_batch_norm(model, strategy.num_replicas_in_sync > 1)
    cost = CostModel(model)
    target = cost.uniform_gbops(4)
    meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps, CANDIDATES)
    search = steps.make_search_step(strategy, model, alpha_opt, groups.alphas, cost, target, 4.0)
    joint = steps.make_joint_step(strategy, model, weight_opt, groups.weights_and_steps, alpha_opt,
                                  groups.alphas, cost, target, 4.0)
    evaluate = steps.make_eval_step(strategy, model,
                                    configure=lambda: wrap.set_mode(model, "mixture"))
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(batches).batch(16))
    outputs = []
    for index, (images, labels) in enumerate(dataset):
        if index == 0:  # inference-mode calibration: no cross-replica sums, equal steps.
            # On batch statistics (synchronized BatchNorm) the steps differ by ~1e-16, and
            # the pooling of an on-grid tensor makes exact ties (sum / 64 = k + 1/2) that
            # such a difference moves across a rounding boundary.
            steps.make_calibrate_step(strategy, model, training=False)(images, labels)
        if index < 2:
            outputs.append(meta(images, labels))
            outputs.append(search(images, labels))
        else:
            outputs.append(joint(images, labels))
        outputs.append(evaluate(images, labels))
    outputs = [{k: float(v) for k, v in out.items()} for out in outputs]
    return outputs, snapshot(all_state(model)), [v.path for v in all_state(model)]


@pytest.fixture
def float64():
    """Keras' default float type set to float64 for one test."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def test_two_cpu_strategy_match_one_device_on_the_same_global_batch(two_cpu_strategy,
                                                                   float64):
    """The same three global batches of 16 on one device and split over two replicas.

    The two runs differ only in float summation order: the replicas' gradient all-reduce,
    synchronized BatchNorm's E[x^2] - E[x]^2 variance against ``tf.nn.moments``, and
    batch-size-dependent kernel blocking. In float32 such a difference (~1e-7 relative)
    moves a value across an LSQ rounding boundary about once per run (~2e6 rounding
    decisions, each within 1e-7 of a boundary with probability ~|x/s| * 1e-7), and one flip
    changes a step-size gradient by a whole ``dy * g`` term: whether the test passed then
    depended on the CPU. In float64 the differences are ~1e-16 relative, a flip is ~1e-9
    likely per run, and everything the runs compute (step outputs, weights, step sizes,
    bit logits, BatchNorm statistics) must agree to rtol 1e-9. SGD keeps differences
    proportional (Adam's first step, ``g / |g|``, would turn the sign noise of a near-zero
    gradient into a full learning-rate step).
    """
    images, labels = random_batch(48, seed=3)
    images = tf.cast(images, tf.float64)
    float_model = tiny_net()
    assert float_model.weights[0].dtype == "float64"
    weights = float_model.get_weights()
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    out_one, state_one, names = _run_all_steps(one, float_model, (images, labels))
    float_model.set_weights(weights)
    out_two, state_two, _ = _run_all_steps(two_cpu_strategy, float_model, (images, labels))
    assert len(out_one) == len(out_two)
    for a, b in zip(out_one, out_two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-9, atol=1e-12, err_msg=key)
    for a, b, name in zip(state_one, state_two, names, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=name)


def test_losses_scale_with_the_global_batch():
    per_example = tf.constant([1.0, 2.0, 3.0, 6.0])
    assert float(losses.scale_loss(per_example, 8)) == pytest.approx(1.5)
    logits = tf.constant([[2.0, -1.0, 0.5]])
    assert float(losses.distillation(logits, logits, 2.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.cost_penalty(tf.constant(1.2), 1.0, 4.0)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="target"):
        losses.cost_penalty(tf.constant(1.0), 0.0, 4.0)


def test_split_batch_meta_step_is_one_pass_per_part_at_its_bits(float64):
    """``meta_batch="split"``: part i of the batch at candidate i, every example once.

    Checked against an eager reference on a copy of the model: per part, set the bits,
    forward, ``sum(loss) / N``; the gradients summed, one SGD step. In float64 (see the
    replica test) both must agree to rtol 1e-9: weights, step sizes and BatchNorm state.
    """
    strategy = tf.distribute.get_strategy()
    float_model = tiny_net()
    images, labels = random_batch(16, seed=5)
    images = tf.cast(images, tf.float64)
    weights = float_model.get_weights()
    model, groups, weight_opt, _ = build(strategy, float_model, weight_lr=0.05, sgd=True)
    calibrated(strategy, model, (images, labels))
    float_model.set_weights(weights)
    ref, ref_groups, ref_opt, _ = build(strategy, float_model, weight_lr=0.05, sgd=True)
    calibrated(strategy, ref, (images, labels))

    meta = steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                                CANDIDATES, meta_batch="split")
    out = {k: float(v) for k, v in meta(images, labels).items()}
    assert [out[f"meta{b}_count"] for b in CANDIDATES] == [5, 5, 6] and out["count"] == 16
    assert out["loss_sum"] == pytest.approx(sum(out[f"meta{b}_loss_sum"] for b in CANDIDATES))

    variables = ref_groups.weights_and_steps
    total = [tf.zeros_like(v) for v in variables]
    for bits, (begin, end) in zip(CANDIDATES, ((0, 5), (5, 10), (10, 16)), strict=True):
        wrap.set_uniform(ref, bits)
        with tf.GradientTape() as tape:
            logits = ref(images[begin:end], training=True)
            loss = tf.reduce_sum(losses.task_loss(labels[begin:end], logits, None, 1.0, 0.0))
            loss = loss / 16.0
        grads = tape.gradient(loss, variables)
        total = [t if g is None else t + tf.convert_to_tensor(g)
                 for t, g in zip(total, grads, strict=True)]
        np.testing.assert_allclose(out[f"meta{bits}_loss_sum"], float(loss) * 16.0, rtol=1e-9)
    ref_opt.apply_gradients(zip(total, variables, strict=True))
    for a, b, v in zip(snapshot(all_state(ref)), snapshot(all_state(model)), all_state(model),
                       strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=v.path)


def test_meta_batch_must_be_full_or_split():
    strategy = tf.distribute.get_strategy()
    model, groups, weight_opt, _ = build(strategy)
    with pytest.raises(ValueError, match="meta_batch"):
        steps.make_meta_step(strategy, model, weight_opt, groups.weights_and_steps,
                             CANDIDATES, meta_batch="half")


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "moving_stats"])
def test_calibrate_step_uses_the_statistics_of_its_mode_and_keeps_the_moving_ones(training):
    """Moving statistics that do not describe the data (variance 100 here, as after a short
    float run): ``training=True`` calibrates on the activations the training steps quantize
    (batch statistics), ``training=False`` on the inference ones; neither changes them."""
    strategy = tf.distribute.get_strategy()
    model, *_ = build(strategy)
    model.get_layer("bn0").moving_variance.assign(np.full(8, 100.0, np.float32))
    moving = [v for v in model.non_trainable_variables if "moving" in v.path]
    before = snapshot(moving)
    images, labels = random_batch()
    steps.make_calibrate_step(strategy, model, training=training)(images, labels)
    assert not any(changed(before, moving))
    wrap.set_mode(model, "float")
    relu0 = keras.Model(model.input, model.get_layer("relu0").output)
    with steps.frozen_batch_norm_statistics(model):
        x = relu0(images, training=training).numpy()
    qp = np.array([ops.quant_range(b, signed=False)[1] for b in CANDIDATES], np.float64)
    np.testing.assert_allclose(model.get_layer("dw1").input_quantizer.step_size.numpy(),
                               2 * np.mean(np.abs(x)) / np.sqrt(qp), rtol=1e-5)
