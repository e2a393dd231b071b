"""What dropping a ``tf.data`` iterator costs at the end of an epoch, with tf.data's
model-based autotuning on (TensorFlow's default) and off (what
:func:`metamix_tf.training.trainer.distribute_dataset` sets), on the demo's train pipeline.

Each epoch draws the pipeline's batches while a stand-in step keeps both cores busy
(``--busy_s`` of 1024x1024 matmuls per batch, about a quantized demo step), then drops the
iterator and creates the next one, as the epoch loop does; the seconds the drop blocks are
summed. The input throughput of the same pipeline (no step, the two settings interleaved)
shows what turning autotuning off costs the input side.

Usage: ``python benchmarks/iterator_release.py [--epochs 12] [--busy_s 0.15]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from metamix_tf import data, run_files  # noqa: E402
from metamix_tf.config import DataConfig  # noqa: E402


def _with_autotune(dataset: tf.data.Dataset, enabled: bool) -> tf.data.Dataset:
    options = tf.data.Options()
    options.autotune.enabled = enabled
    return dataset.with_options(options)


def release_seconds(dataset: tf.data.Dataset, epochs: int, busy_s: float) -> list[float]:
    """Seconds each epoch's ``del iterator`` blocked, after a busy epoch."""
    x = tf.random.uniform((1024, 1024))
    seconds = []
    for _ in range(epochs):
        iterator = iter(dataset)
        for _batch in iterator:
            began = time.perf_counter()
            while time.perf_counter() - began < busy_s:
                tf.matmul(x, x).numpy()
        began = time.perf_counter()
        del iterator
        seconds.append(time.perf_counter() - began)
    return seconds


def images_per_second(dataset: tf.data.Dataset, batches: int) -> float:
    began, count = time.perf_counter(), 0
    for index, (images, _) in enumerate(dataset.repeat()):
        count += int(images.shape[0])
        if index + 1 == batches:
            break
    return count / (time.perf_counter() - began)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist_embedded")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--busy_s", type=float, default=0.15)
    parser.add_argument("--throughput_batches", type=int, default=300)
    args = parser.parse_args(argv)
    train = data.load(DataConfig(dataset=args.dataset)).train
    settings = {"autotune on": True, "autotune off": False}
    results = {}
    print(f"{args.dataset} train pipeline, {os.cpu_count()} CPU cores "
          f"({run_files.cpu_model()}), TF {tf.__version__}; "
          f"{args.epochs} epochs with a {args.busy_s:.2f} s busy step per batch")
    print("| tf.data | iterator release: total s | worst s | epochs over 0.1 s | input img/s |")
    print("|---|---:|---:|---:|---:|")
    rates = {name: [] for name in settings}
    for _ in range(3):  # interleaved, after one warm-up pass each
        for name, enabled in settings.items():
            rates[name].append(images_per_second(_with_autotune(train, enabled),
                                                 args.throughput_batches))
    for name, enabled in settings.items():
        seconds = release_seconds(_with_autotune(train, enabled), args.epochs, args.busy_s)
        rate = sorted(rates[name][1:])[len(rates[name][1:]) // 2]
        results[name] = {"release_s": seconds, "images_per_s": rate}
        print(f"| {name} | {sum(seconds):.2f} | {max(seconds):.2f} | "
              f"{sum(s > 0.1 for s in seconds)}/{len(seconds)} | {rate:,.0f} |")
    return results


if __name__ == "__main__":
    main()
