"""Training-step overhead of the MetaMix quantizers versus the float model.

Builds a float MobileNetV2 (``keras.applications``, random weights, 32x32x3 inputs, 10
classes, batch 128 of random data) and two wrapped copies (``metamix_tf.apply``):

* ``selected``: every activation quantizer in ``"selected"`` mode at one bit-width (4 bits;
  8 for the first and last layer) and per-channel weight quantization on; the step trains
  weights, BatchNorm and all step sizes (phase 2, weight training).
* ``mixture``: every searchable activation quantizer in ``"mixture"`` mode over 3
  candidates (2, 4, 8 bits), weights in float; the step trains weights, BatchNorm,
  activation step sizes and bit logits (the joint-search step, the heaviest: MetaMix's own
  bit-search step differentiates only the logits and skips the step-size terms).

Each training step is one ``tf.function`` with ``jit_compile=False`` (the step itself is
not XLA-compiled; the quantizers' elementwise kernels are, see :mod:`metamix_tf.quant.ops`), a
``GradientTape`` and an SGD update. After warm-up, the variants run interleaved:
``--rounds`` rounds, each running ``--steps`` steps of every variant in a rotating order.
The result is the ratio to float: per round, the variant's median step time over the float
model's in the same round (so changes in the machine's load mostly cancel), and the median
over rounds. The table also gives the median and fastest milliseconds per step (machine
dependent), the ratio of the fastest steps (the least disturbed by other processes) and
the ratio of median process CPU time per step.

Usage: ``python benchmarks/step_overhead.py [--batch 128] [--rounds 15] [--steps 2]``
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

import metamix_tf  # noqa: E402

TARGETS = {"selected": 1.25, "mixture": 1.6}


def build_float(input_size: int) -> keras.Model:
    return keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3), weights=None, classes=10,
        classifier_activation=None)


def trained_variables(name: str, model: keras.Model) -> list:
    """What each variant steps: float: everything; selected (weight training): weights, BN
    and every step size; mixture (joint search): weights, BN, activation step sizes and bit
    logits (the disabled weight quantizers' steps have no gradient)."""
    if name == "float":
        return model.trainable_variables
    groups = metamix_tf.variable_groups(model)
    if name == "selected":
        return groups.weights_and_steps
    return (groups.weights + [q.step_size for q in metamix_tf.activation_quantizers(model)]
            + groups.alphas)


def make_step(model: keras.Model, variables: list, learning_rate: float = 1e-3):
    optimizer = keras.optimizers.SGD(learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer.build(variables)

    @tf.function(jit_compile=False)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    return step


def build_variants(input_size: int, images) -> dict:
    float_model = build_float(input_size)
    config = metamix_tf.QuantConfig(candidate_bits=(2, 4, 8), weight_bits=4)

    selected = metamix_tf.apply(float_model, config)
    metamix_tf.calibrate(selected, images)
    metamix_tf.select_bits(selected, {
        q_layer.name: 4 for q_layer in metamix_tf.quant_layers(selected)
        if q_layer.input_quantizer.searchable})
    metamix_tf.enable_weight_quantization(selected)

    mixture = metamix_tf.apply(float_model, config)
    metamix_tf.calibrate(mixture, images)
    metamix_tf.set_mode(mixture, "mixture")
    return {"float": float_model, "selected": selected, "mixture": mixture}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="print every round's ratios")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.uniform(-1, 1, (args.batch, args.input_size, args.input_size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, args.batch), tf.int32)

    models = build_variants(args.input_size, images)
    steps = {name: make_step(model, trained_variables(name, model))
             for name, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step(images, labels).numpy()

    # Interleaved rounds: every round runs one step of each variant, in a rotating order,
    # and each variant's ratio for the round is its time over the float step of the same
    # round, which cancels slow drifts of the machine's load (other processes).
    names = list(steps)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    ratios = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        this_round = {}
        for name in order:
            this_round[name] = []
            for _ in range(args.steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                steps[name](images, labels).numpy()
                this_round[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        base = statistics.median(this_round["float"])
        for name in names:
            times[name].extend(this_round[name])
            ratios[name].append(statistics.median(this_round[name]) / base)

    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    result = {name: statistics.median(ratios[name]) for name in names}
    if args.verbose:
        for name in names:
            print(name, "per-round ratios:", " ".join(f"{r:.2f}" for r in ratios[name]))
    print(f"MobileNetV2 {args.input_size}x{args.input_size}x3, batch {args.batch}, "
          f"{os.cpu_count()} CPU cores, TF {tf.__version__}, Keras {keras.__version__}, "
          f"jit_compile=False (training step); metamix_tf from "
          f"{os.path.dirname(metamix_tf.__file__)}; {args.rounds} interleaved rounds x "
          f"{args.steps} steps per variant")
    fastest = {name: min(t) for name, t in times.items()}
    print("| variant | ratio vs float | target | ms/step (median) | ms/step (fastest) "
          "| ratio of fastest | CPU-time ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        target = TARGETS.get(name)
        target_text = f"<= {target:.2f}x" if target else "-"
        print(f"| {name} | {result[name]:.2f}x | {target_text} | {medians[name] * 1e3:.1f} "
              f"| {fastest[name] * 1e3:.1f} | {fastest[name] / fastest['float']:.2f}x "
              f"| {cpu_medians[name] / cpu_medians['float']:.2f}x |")
    print("ratio vs float (the result): median over rounds of the variant's median step time "
          "over float's in the same round. Also: the fastest step of each variant (the least "
          "disturbed by other processes) and the median process CPU time per step, each as a "
          "ratio to float's.")
    return result


if __name__ == "__main__":
    main()
