"""The library's float training step beside a bare ``tf.function`` step, interleaved.

Same model (MobileNetV2 32x32x3, 10 classes, random weights and data, batch 128), same SGD
update: ``steps.make_train_step`` (``tf.distribute`` replica call, reduced loss / correct /
count) against a plain tape-and-apply ``tf.function``. The ratio is what the library's step
wrapper costs on its own.

Usage: ``python benchmarks/step_wrapper.py [--rounds 8]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from metamix_tf.training import steps  # noqa: E402


def _model_and_optimizer():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10,
                                           classifier_activation=None)
    optimizer = keras.optimizers.SGD(1e-3)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def bare_step(model, optimizer):
    variables = model.trainable_variables
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=False)
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return {"loss": loss}

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (128, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, 128), tf.int32)
    fns = {"bare": bare_step(*_model_and_optimizer())}
    model, optimizer = _model_and_optimizer()
    fns["library"] = steps.make_train_step(tf.distribute.get_strategy(), model, optimizer,
                                           model.trainable_variables)
    times = {name: [] for name in fns}
    for index in range(args.rounds + 3):
        for name, fn in fns.items():
            start = time.perf_counter()
            for value in fn(images, labels).values():
                value.numpy()
            if index >= 3:  # the first calls trace
                times[name].append(time.perf_counter() - start)
    bare, library = (statistics.median(times[n]) for n in ("bare", "library"))
    print(f"MobileNetV2 32x32, batch 128, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}: bare {bare * 1e3:.0f} ms, library {library * 1e3:.0f} ms "
          f"({library / bare:.2f}x)")


if __name__ == "__main__":
    main()
