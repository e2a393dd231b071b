"""End-to-end runs of ``pipeline.run`` on a tiny network and a few hundred embedded MNIST
digits: outputs, resume after an interruption, baselines, and bad input."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT

from metamix_tf import config as config_lib
from metamix_tf import pipeline, run_checks
from metamix_tf.quant import wrap
from metamix_tf.quant.quantizers import ActivationQuantizer, WeightQuantizer
from metamix_tf.training.trainer import NonFiniteLossError


def tiny_net(input_shape, num_classes):
    """A 5-conv net (stride-2 stem) with explicit names, so runs are repeatable."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for i, (filters, strides) in enumerate([(32, 2), (32, 1), (64, 2)]):
        x = keras.layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                                         name=f"dw{i}")(x)
        x = keras.layers.BatchNormalization(name=f"dw{i}_bn")(x)
        x = keras.layers.ReLU(name=f"dw{i}_relu")(x)
        x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
        x = keras.layers.BatchNormalization(name=f"pw{i}_bn")(x)
        x = keras.layers.ReLU(name=f"pw{i}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny")


def tiny_config(model_dir, **overrides) -> config_lib.ExperimentConfig:
    values = {
        "model_dir": str(model_dir),
        "model": {"name": "tiny", "bn_momentum": 0.7},
        "quant": {"candidate_bits": [2, 4, 8]},
        "data": {"max_train_examples": 512, "max_eval_examples": 128, "batch_size": 64,
                 "eval_batch_size": 128},
        "pretrain": {"epochs": 3, "learning_rate": 3e-2},
        "search": {"epochs": 2, "warmup_epochs": 1, "alpha_learning_rate": 5e-2,
                   "target_avg_bits": 4.0},
        "finetune": {"epochs": 1},
    }
    return config_lib.load([], config_lib.merge(values, overrides))


def run(config, phase="all", **kwargs):
    return pipeline.run(config, phase, model_fn=tiny_net, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run with every phase."""
    model_dir = tmp_path_factory.mktemp("reference")
    keras.utils.clear_session()
    summary = run(tiny_config(model_dir))
    return model_dir, summary


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_all_phases_write_the_run_directory(reference):
    model_dir, summary = reference
    for name in ("config.yaml", "float.keras", "search.keras", "final.keras", "bits.json",
                 "bits.png", "summary.json", "pretrain.done", "search.done", "finetune.done"):
        assert os.path.exists(model_dir / name), name
    for phase in ("pretrain", "search", "finetune"):
        assert tf.train.latest_checkpoint(str(model_dir / "ckpt" / phase)), phase
        assert os.listdir(model_dir / "logs" / phase), phase
    bits = read_json(model_dir / "bits.json")
    assert set(bits) >= {"searcher", "bits", "gbops", "target_gbops", "avg_activation_bits",
                         "report"}
    assert bits["searcher"] == "metamix"
    assert bits["bits"]["stem"] == 8 and bits["bits"]["logits"] == 8  # first / last fixed
    assert all(b in (2, 4, 8) for b in bits["bits"].values())
    on_disk = read_json(model_dir / "summary.json")
    assert on_disk["final_val_acc"] == summary["final_val_acc"]
    for key in ("float_val_acc", "search_val_acc", "final_val_acc", "gbops", "target_gbops",
                "avg_activation_bits", "wall_time_s", "machine"):
        assert key in summary, key
    assert set(summary["wall_time_s"]) == {"pretrain", "search", "finetune"}
    # Where the time went: each phase's epochs split into parts, plus the rest of the phase.
    for phase, r in summary["phases"].items():
        profile = r["profile_s"]
        assert set(profile) == {"input", "steps", "evaluation", "checkpoint", "other",
                                "outside_epochs"}, phase
        assert all(v >= 0 for v in profile.values()) and profile["steps"] > 0, phase
        # the parts add up to the phase (each part and epoch time is rounded to 10 ms)
        assert sum(profile.values()) == pytest.approx(r["phase_seconds_this_process"],
                                                      abs=0.5), phase
    assert "[search]" in pipeline.format_profile(summary)
    assert summary["float_val_acc"] > 0.3  # 10 classes; 3 epochs of 512 digits
    assert summary["gbops"] == pytest.approx(bits["gbops"])
    # The exporter's input: selected mode at the searched bits, weight quantization on.
    final = keras.saving.load_model(model_dir / "final.keras", compile=False)
    quantizers = wrap.activation_quantizers(final)
    assert quantizers and all(isinstance(q, ActivationQuantizer) for q in quantizers)
    assert all(q.mode == "selected" for q in quantizers)
    weight_quantizers = wrap.weight_quantizers(final)
    assert all(isinstance(q, WeightQuantizer) and q.enabled for q in weight_quantizers)
    assert wrap.get_bits(final) == bits["bits"]
    assert wrap.output_quantizers(final)  # the logits at least
    # the search met its GBOPs target (search.enforce_target)
    assert bits["gbops"] <= bits["target_gbops"] * (1 + 1e-9)
    assert bits["argmax_gbops"] >= bits["gbops"] - 1e-12
    # biases moved onto the int8 grid after weight training, then evaluated
    snap = read_json(model_dir / "summary.json")["phases"]["finetune"]["bias_snap"]
    assert snap["layers"] == len(bits["bits"]) and 0 < snap["max_shift_units"] <= 0.5 + 1e-6
    assert snap["val_acc_after"] == summary["final_val_acc"]
    config = config_lib.load([str(model_dir / "config.yaml")])
    assert config.search.searcher == "metamix" and config.pretrain.epochs == 3


class Interrupt(Exception):
    pass


def test_resume_after_interruptions_reaches_the_same_bits(reference, tmp_path):
    """Killed after the first pre-training epoch, then after the first search epoch, the
    same call resumes each time and ends with the reference's bits and accuracy."""
    ref_dir, ref = reference
    config = tiny_config(tmp_path)
    for stop_phase in ("pretrain", "search"):
        def stop(phase, epoch, record, stop_phase=stop_phase):
            if phase == stop_phase and epoch == 0:
                raise Interrupt(phase)

        keras.utils.clear_session()
        with pytest.raises(Interrupt):
            run(config, on_epoch_end=stop)
        assert not os.path.exists(tmp_path / f"{stop_phase}.done")
    keras.utils.clear_session()
    summary = run(config)
    assert read_json(tmp_path / "bits.json")["bits"] == read_json(ref_dir / "bits.json")["bits"]
    # The data order and the states are restored exactly, so only float noise remains.
    for key in ("float_val_acc", "search_val_acc", "final_val_acc"):
        assert summary[key] == pytest.approx(ref[key], abs=0.02), key
    history = read_json(tmp_path / "ckpt" / "search" / "history.json")
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow  # about 85 s on 2 cores
def test_all_phases_under_mirrored_strategy_with_distillation(tmp_path, two_cpu_strategy):
    """Two replicas: checkpoints of mirrored variables, models loaded in the strategy's
    scope, KD from the float model in both search and weight training, and a resume."""
    config = tiny_config(tmp_path, pretrain={"epochs": 1},
                         search={"teacher": "self"}, finetune={"teacher": "self"})

    def stop(phase, epoch, record):
        if phase == "search" and epoch == 0:
            raise Interrupt(phase)

    with pytest.raises(Interrupt):
        run(config, strategy=two_cpu_strategy, on_epoch_end=stop)
    summary = run(config, strategy=two_cpu_strategy)
    assert summary["machine"]["strategy"] == "MirroredStrategy with 2 replica(s)"
    assert [h["epoch"] for h in read_json(tmp_path / "ckpt" / "search" / "history.json")] \
        == [1, 2]
    final = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    assert wrap.get_bits(final) == read_json(tmp_path / "bits.json")["bits"]
    assert not any(layer.synchronized for layer in final.layers
                   if isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.parametrize("searcher", ["joint", "none"])
def test_baselines_run_in_the_same_loop(reference, tmp_path, searcher):
    ref_dir, _ = reference
    for name in ("float.keras", "pretrain.done"):  # reuse the float model
        shutil.copy(ref_dir / name, tmp_path / name)
    config = tiny_config(tmp_path, search={"searcher": searcher, "uniform_bits": 2})
    summary = run(config)
    bits = read_json(tmp_path / "bits.json")
    assert bits["searcher"] == searcher and "final_val_acc" in summary
    searchable = {k: v for k, v in bits["bits"].items() if k not in ("stem", "logits")}
    if searcher == "none":
        assert set(searchable.values()) == {2}


def test_phase_by_phase_needs_the_previous_phase(tmp_path):
    with pytest.raises(FileNotFoundError, match="float.keras"):
        run(tiny_config(tmp_path), phase="search")
    with pytest.raises(FileNotFoundError, match="bits.json"):
        run(tiny_config(tmp_path), phase="finetune")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, pretrain={"epochs": 3, "learning_rate": 3e-2})

    def poison(phase, epoch, record):
        model_vars = poison.model.trainable_variables
        model_vars[0].assign(np.full(model_vars[0].shape, np.nan, np.float32))

    def model_fn(shape, classes):
        poison.model = tiny_net(shape, classes)
        return poison.model

    with pytest.raises(NonFiniteLossError, match=r"phase 'pretrain' at epoch 2, step 1"):
        pipeline.run(config, "all", model_fn=model_fn, verbose=False, on_epoch_end=poison)
    latest = tf.train.latest_checkpoint(str(tmp_path / "ckpt" / "pretrain"))
    assert latest.endswith("ckpt-1")
    assert not os.path.exists(tmp_path / "pretrain.done")
    reader = tf.train.load_checkpoint(latest)
    values = [reader.get_tensor(name) for name, _ in tf.train.list_variables(latest)
              if name.startswith("model/") and "OPTIMIZER" not in name]
    assert values and all(np.all(np.isfinite(v)) for v in values if v.dtype.kind == "f")


@pytest.mark.parametrize("overrides,error,match", [
    ({"model": {"name": "nope"}}, ValueError, "Unknown model"),
    ({"data": {"dataset": "no_such_dataset_xyz"}}, ValueError, "Unknown dataset"),
    ({"data": {"dataset": "folder:/no/such/folder"}}, FileNotFoundError, "does not exist"),
    ({"search": {"target_gbops": 1e6}}, ValueError, "outside what the candidate bits allow"),
    ({"search": {"target_gbops": 1e-9}}, ValueError, "outside what the candidate bits allow"),
    ({"search": {"target_avg_bits": 1.0}}, ValueError, "outside the candidate bits"),
])
def test_bad_input_is_a_clear_error(tmp_path, overrides, error, match):
    config = tiny_config(tmp_path, **overrides)
    model_fn = None if overrides.get("model") else tiny_net
    with pytest.raises(error, match=match):
        pipeline.run(config, "all", model_fn=model_fn, verbose=False)
    assert not os.path.exists(tmp_path / "float.keras")  # nothing trained before the check


def test_image_folder_without_readable_images(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    config = tiny_config(tmp_path / "run", data={"dataset": f"folder:{tmp_path / 'data'}"})
    with pytest.raises(ValueError, match="No JPEG/PNG"):
        run(config)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--model=nope",
         f"--model_dir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "error: Unknown model name" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["demo_mnist", "cifar10_mobilenet_v2",
                                  "imagenet_mobilenet_v2"])
def test_shipped_configs_load(name):
    config = config_lib.load([os.path.join(ROOT, "configs", f"{name}.yaml")])
    run_checks.check(config, "all", None)
    if name == "demo_mnist":  # the main command runs the defaults: keep them the same
        assert config_lib.to_dict(config) == config_lib.to_dict(config_lib.ExperimentConfig())


def test_a_failing_bias_snap_keeps_the_trained_weights(tmp_path, reference, monkeypatch):
    """Post-processing after weight training (the bias snap) fails: ``final.keras`` holds
    the trained weights all the same, and the finetune phase is not marked done."""
    ref_dir, _ = reference
    model_dir = tmp_path / "run"
    shutil.copytree(ref_dir, model_dir)
    for name in ("finetune.done", "final.keras", "summary.json"):
        (model_dir / name).unlink(missing_ok=True)
    shutil.rmtree(model_dir / "ckpt" / "finetune", ignore_errors=True)

    from metamix_tf import api

    def broken(*args):
        raise RuntimeError("post-processing failed")

    monkeypatch.setattr(api.export_graph, "snap_biases", broken)
    with pytest.raises(RuntimeError, match="post-processing failed"):
        run(tiny_config(model_dir), "finetune")
    assert (model_dir / "final.keras").exists()
    assert not (model_dir / "finetune.done").exists()
    final = keras.models.load_model(model_dir / "final.keras")
    assert all(wq.enabled for wq in wrap.weight_quantizers(final))


def test_a_saved_model_is_handed_to_the_next_phase_once(tmp_path):
    """The model a phase saves is what the next phase of the same process reads (no
    deserialization); a second read, as a phase in a new process, loads the file."""
    ctx = pipeline.RunContext(
        config=None, strategy=None, data=None, model_dir=str(tmp_path), iterators=None,
        eval_dataset=None, steps_per_epoch=0, jit_compile=False, model_fn=None, verbose=False,
        on_epoch_end=None)
    model = tiny_net((32, 32, 3), 10)
    ctx.save_model(model, "float.keras")
    assert os.path.exists(tmp_path / "float.keras")
    assert ctx.load_model("float.keras", "Float model", "run the pretrain phase") is model
    loaded = ctx.load_model("float.keras", "Float model", "run the pretrain phase")
    assert loaded is not model
    for saved, read in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(saved),
                                      keras.ops.convert_to_numpy(read))
    with pytest.raises(FileNotFoundError, match="run the pretrain phase"):
        ctx.load_model("search.keras", "Searched model", "run the pretrain phase")
