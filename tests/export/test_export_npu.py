"""Tests for metamix_tf.export.npu: LiteRT's AOT path runs on an exported file and reports,
per vendor target, a compiled size or the compiler plugin's reason (on a machine without the
vendor toolchains every target fails, with a reason)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from metamix_tf.export import npu


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    path = tmp_path_factory.mktemp("npu") / "tiny.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return str(path)


def test_every_registered_target_compiles_or_says_why(tiny_tflite):
    result = npu.compile_model(tiny_tflite)
    assert {"Qualcomm", "MediaTek"} <= set(result)  # LiteRT 2.3 registers both
    for vendor, r in result.items():
        assert r["compiled"] or r["failed"], vendor
        for c in r["compiled"]:
            assert c["bytes"] is None or c["bytes"] > 0
        for target, reason in r["failed"].items():
            assert reason.strip() and "See /tmp" not in reason, (target, reason)
    assert np.sum([len(r["compiled"]) + len(r["failed"]) for r in result.values()]) > 10
