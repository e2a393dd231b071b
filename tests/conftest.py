"""Test setup: quiet TF logs and two logical CPU devices (for tf.distribute tests).

The logical devices must be configured before TensorFlow initialises its devices, so this
runs at import time, before any test module builds a tensor.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
# RuntimeError: devices already initialised (e.g. another conftest ran first).
with contextlib.suppress(RuntimeError):
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture
def two_cpu_strategy():
    """A MirroredStrategy over two logical CPU devices."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.skip("two logical CPU devices are not available")
    from metamix_tf.training import distribute

    return distribute.mirrored_strategy(devices)


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    import keras

    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    yield
