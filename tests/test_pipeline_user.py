"""pipeline.run with a user's model (a nested backbone) and user datasets."""

import json

import keras
import numpy as np
import pytest

from metamix_tf import config as config_lib
from metamix_tf import pipeline

L = keras.layers


def _nested_model():
    inner = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", name="stem")(inner)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.ReLU(name="dw_relu")(x)
    x = L.Conv2D(16, 1, name="pw")(x)
    backbone = keras.Model(inner, L.ReLU(name="pw_relu")(x), name="backbone")
    inp = keras.Input((12, 12, 3))
    y = L.GlobalAveragePooling2D(name="gap")(backbone(inp))
    return keras.Model(inp, L.Dense(3, name="head")(y), name="user")


def _arrays(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 12, 12, 3)).astype(np.float32)
    return x, rng.integers(0, 3, n).astype(np.int32)


def _config(model_dir):
    values = {"model_dir": str(model_dir), "model": {"name": "user"},
              "quant": {"candidate_bits": [2, 4, 8]},
              "data": {"batch_size": 16, "eval_batch_size": 32},
              "pretrain": {"epochs": 1}, "search": {"epochs": 1, "warmup_epochs": 0},
              "finetune": {"epochs": 1}}
    return config_lib.load([], config_lib.merge({}, values))


def test_run_with_a_user_model_and_arrays(tmp_path):
    model = _nested_model()
    before = [w.copy() for w in model.get_weights()]
    summary = pipeline.run(_config(tmp_path), model=model,
                           datasets=(_arrays(64, 0), _arrays(32, 1)), verbose=False)
    assert summary["dataset"] == "user data" and summary["train_size"] == 64
    with open(tmp_path / "bits.json") as f:
        bits = json.load(f)["bits"]
    assert list(bits) == ["stem", "dw", "pw", "head"]  # the backbone's layers, flattened
    assert "final_val_acc" in summary
    for a, b in zip(model.get_weights(), before, strict=True):  # the caller's model is
        np.testing.assert_array_equal(a, b)  # not trained in place


def test_user_model_with_wrong_classes_is_refused(tmp_path):
    x, y = _arrays(32, 0)
    with pytest.raises(ValueError, match="labels up to 4 but `model` has 3 outputs"):
        pipeline.run(_config(tmp_path), model=_nested_model(), verbose=False,
                     datasets=((x, y + 2), (x, y + 2)))
