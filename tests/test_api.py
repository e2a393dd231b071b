"""metamix_tf.search / finetune / export_tflite on a user's model and arrays or datasets:
results, callbacks and bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import three_conv_model

import metamix_tf as mm

L = keras.layers
QUIET = dict(batch_size=16, verbose=False)


def _float_model(outputs=1):
    return three_conv_model(outputs)


def _qmodel(outputs=1):
    return mm.apply(_float_model(outputs), mm.QuantConfig(candidate_bits=(2, 4, 8)))


def _data(n=48):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    return x, (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(np.int32) * 3


def test_search_then_finetune_on_arrays():
    qmodel, (x, y) = _qmodel(), _data()
    result = mm.search(qmodel, (x, y), target_avg_bits=4, epochs=2, warmup_epochs=1,
                       validation_data=(x, y), **QUIET)
    assert set(result.bits) == {"c1", "c2", "c3", "fc0"}
    assert result.bits["c1"] == 8 and result.bits["fc0"] == 8  # first / last fixed
    assert result.gbops <= result.target_gbops * (1 + 1e-9)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert {"loss", "acc", "val_loss", "val_acc", "search_loss", "sel_gbops"} <= set(
        result.history[-1])
    assert mm.get_bits(qmodel) == result.bits
    assert all(q.mode == "selected" for q in mm.activation_quantizers(qmodel))
    tuned = mm.finetune(qmodel, (x, y), epochs=1, validation_data=(x, y), **QUIET)
    assert tuned.bits == result.bits and len(tuned.history) == 1
    assert all(wq.enabled for wq in mm.weight_quantizers(qmodel))
    assert tuned.val_acc is not None


def test_uniform_searcher_on_a_dataset_selects_its_bits():
    qmodel, (x, y) = _qmodel(), _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    result = mm.search(qmodel, dataset, searcher="uniform", epochs=1, uniform_bits=2,
                       verbose=False)
    assert result.bits == {"c1": 8, "c2": 2, "c3": 2, "fc0": 8}
    assert result.val_acc is None  # no validation data


class _Recorder(keras.callbacks.Callback):
    def __init__(self, stop_after=None):
        super().__init__()
        self.logs, self.calls, self.stop_after = [], [], stop_after

    def on_train_begin(self, logs=None):
        self.calls.append("begin")

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        if self.stop_after is not None and epoch + 1 >= self.stop_after:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.calls.append("end")


def test_callbacks_get_epoch_logs_and_can_stop(tmp_path):
    qmodel, (x, y) = _qmodel(), _data()
    recorder = _Recorder(stop_after=1)
    csv = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    result = mm.finetune(qmodel, (x, y), epochs=3, validation_data=(x, y),
                         callbacks=[recorder, csv], **QUIET)
    assert len(result.history) == 1 and recorder.calls == ["begin", "end"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(recorder.logs[0])
    assert all(isinstance(v, float) for v in recorder.logs[0].values())
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert len(lines) == 2 and "val_loss" in lines[0]


def test_custom_loss_is_the_training_signal():
    qmodel, (x, y) = _qmodel(), _data()
    kernel = qmodel.get_layer("c2").kernel.numpy().copy()
    result = mm.finetune(qmodel, (x, y), epochs=1, weight_decay=0.0,
                         loss=lambda labels, logits: 0.0 * logits[:, 0], **QUIET)
    assert result.history[0]["loss"] == 0.0
    np.testing.assert_array_equal(qmodel.get_layer("c2").kernel.numpy(), kernel)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    result = mm.finetune(qmodel, (x, y), epochs=1, loss=keras_loss, **QUIET)
    assert result.history[0]["loss"] > 0
    with pytest.raises(ValueError, match="one loss per example"):
        mm.finetune(qmodel, (x, y), epochs=1, loss=lambda labels, logits: tf.reduce_mean(
            logits), **QUIET)


def test_checkpoint_dir_resumes(tmp_path):
    (x, y) = _data()
    first = _qmodel()
    mm.finetune(first, (x, y), epochs=1, checkpoint_dir=str(tmp_path), **QUIET)
    second = _qmodel()
    result = mm.finetune(second, (x, y), epochs=1, checkpoint_dir=str(tmp_path), **QUIET)
    assert len(result.history) == 1  # restored the finished epoch, trained none
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_export_tflite_writes_int8_and_verifies(tmp_path):
    qmodel, (x, y) = _qmodel(), _data()
    mm.search(qmodel, (x, y), target_avg_bits=4, epochs=1, warmup_epochs=0, **QUIET)
    mm.finetune(qmodel, (x, y), epochs=1, **QUIET)
    report = mm.export_tflite(qmodel, str(tmp_path), representative_data=x,
                              eval_data=(x, y), formats=("int8",), latency_runs=1,
                              latency_rounds=1, tensor_costs=False)
    assert (tmp_path / "model_int8.tflite").exists()
    assert report["bits"] and "verification" in report


BAD_SEARCH = [
    (dict(target_gbops=0.001, target_avg_bits=4), "target once.*Received: target_gbops="),
    (dict(), "target once.*Received: target_gbops=None, target_avg_bits=None"),
    (dict(target_avg_bits=4, searcher="random"), "Received: searcher='random'"),
    (dict(searcher="uniform", target_avg_bits=4), "Received: target_avg_bits=4"),
    (dict(target_avg_bits=4, learning_rte=1e-3), "Received: learning_rte=0.001"),
    (dict(target_avg_bits=4, loss=3), "Received: loss=3"),
    (dict(target_avg_bits=9), "outside the candidate bits.*Received: target_avg_bits=9"),
    (dict(target_avg_bits=4, teacher="float.keras"), "Received: teacher=str"),
    (dict(target_avg_bits=4, meta_candidates=9), r"in \[1, 3\].*Received: meta_candidates=9"),
]


@pytest.mark.parametrize("kwargs,match", BAD_SEARCH)
def test_bad_search_arguments_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mm.search(_qmodel(), _data(), epochs=1, **QUIET, **kwargs)


def test_bad_data_and_models_are_one_clear_error():
    x, y = _data()
    with pytest.raises(ValueError, match=r"\(images, labels\) batches.*Received: element_spec"):
        mm.finetune(_qmodel(), tf.data.Dataset.from_tensor_slices(x).batch(8), epochs=1)
    with pytest.raises(ValueError, match="integer labels.*Received: x.shape"):
        mm.finetune(_qmodel(), (x, y.astype(np.float32)), epochs=1)
    with pytest.raises(ValueError, match="Received: train_data=dict"):
        mm.finetune(_qmodel(), {"x": x}, epochs=1)
    with pytest.raises(ValueError, match="Received: inputs=1, outputs=2"):
        mm.finetune(_qmodel(outputs=2), (x, y), epochs=1)
    with pytest.raises(ValueError, match="Received: qmodel=Functional"):
        mm.finetune(_float_model(), (x, y), epochs=1)
    with pytest.raises(ValueError, match="BackupAndRestore"):
        mm.finetune(_qmodel(), (x, y), epochs=1, verbose=False,
                    callbacks=[keras.callbacks.BackupAndRestore("/tmp/unused")])


def test_search_rules_are_applied_and_recorded():
    """Issue 12's settings reach the searcher: the absolute cost form scales lambda by the
    target, the displacement rule sets lr x alpha steps, the tie-break picks the start."""
    qmodel, (x, y) = _qmodel(), _data()
    first_alphas = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:
                first_alphas.update({q.name: q.alpha.numpy().copy()
                                     for q in mm.activation_quantizers(qmodel)
                                     if q.searchable})

    result = mm.search(qmodel, (x, y), target_avg_bits=4, epochs=2, warmup_epochs=1,
                       cost_normalization="absolute", cost_weight=4.0,
                       alpha_lr_rule="displacement", alpha_displacement=0.5,
                       alpha_init_bias=0.01, alpha_l2=1e-3, callbacks=[Spy()], **QUIET)
    s = result.settings
    assert s["relative_cost_weight"] == pytest.approx(4.0 * result.target_gbops)
    steps_per_epoch = 48 // 16
    assert s["alpha_learning_rate"] == pytest.approx(0.5 / steps_per_epoch)  # 1 search epoch
    assert s["alpha_init_bits"] == 4 and first_alphas
    for alpha in first_alphas.values():  # the start is the tie-break, argmax at 4 bits
        np.testing.assert_array_equal(alpha, np.float32([0.0, 0.01, 0.0]))
    assert result.record()["settings"] == s


def _tags(folder) -> dict:
    """``tag -> [steps]`` of the TensorBoard event files in ``folder``."""
    tags: dict = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_tensorboard_overlays_train_and_validation_and_logs_search_steps(tmp_path):
    qmodel, (x, y) = _qmodel(), _data()  # 48 images, batch 16: 3 steps per epoch
    mm.search(qmodel, (x, y), target_avg_bits=4, epochs=2, warmup_epochs=1,
              validation_data=(x, y), log_dir=str(tmp_path), **QUIET)
    train, validation = _tags(tmp_path / "train"), _tags(tmp_path / "validation")
    assert validation["search/loss"] == [1, 2] and validation["search/acc"] == [1, 2]
    assert train["search/loss"] == [1, 2] and "search/val_loss" not in train
    assert train["search_step/loss"] == list(range(1, 7))  # the phase's global steps
    assert {"search_step/search_gbops", "search_step/search_penalty"} <= set(train)
    meta = {tag for tag in train if tag.startswith("search_step_meta_losses/")}
    assert meta == {f"search_step_meta_losses/{b}" for b in (2, 4, 8)}
