"""The epoch loop's datasets: what :func:`metamix_tf.training.trainer.distribute_dataset`
changes (tf.data's autotuning) and what it keeps (every batch, in order, epoch by epoch)."""

import numpy as np
import tensorflow as tf

from metamix_tf.training import loop as loop_lib
from metamix_tf.training import trainer


def _pipeline():
    """Seeded reshuffle, a parallel map and a prefetch, both ``AUTOTUNE``: the demo's shape."""
    ds = tf.data.Dataset.range(40).shuffle(40, seed=3, reshuffle_each_iteration=True)
    ds = ds.batch(8, drop_remainder=True)
    ds = ds.map(lambda i: (tf.cast(i, tf.float32) * 2.0, i), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _epochs(dataset, count=2):
    return [[x.numpy() for x, _ in dataset] for _ in range(count)]


def test_autotuning_is_turned_off_and_the_batches_stay_the_same():
    strategy = tf.distribute.get_strategy()
    distributed = trainer.distribute_dataset(strategy, _pipeline())
    assert _pipeline().options().autotune.enabled is None  # TensorFlow's default: on
    assert distributed.options().autotune.enabled is False
    expected, got = _epochs(_pipeline()), _epochs(distributed)
    assert not np.array_equal(expected[0], expected[1])  # reshuffled each epoch
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(np.stack(have), np.stack(want))


def test_an_explicit_autotune_setting_is_kept():
    options = tf.data.Options()
    options.autotune.enabled = True
    dataset = _pipeline().with_options(options)
    distributed = trainer.distribute_dataset(tf.distribute.get_strategy(), dataset)
    assert distributed.options().autotune.enabled is True


def test_epoch_iterators_and_the_user_loop_use_it():
    x = np.zeros((16, 4, 4, 3), np.float32)
    y = np.zeros(16, np.int32)
    loop = loop_lib.make_loop((x, y), (x, y), batch_size=8)
    assert loop.eval_dataset.options().autotune.enabled is False
    assert loop.iterators.distributed.options().autotune.enabled is False
