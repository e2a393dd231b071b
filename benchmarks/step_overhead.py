"""Training-step cost of quantization and of each searcher, timed on the library's own
step functions (``metamix_tf.training.steps``), at two input sizes.

For each setting (default: MobileNetV2 at 32x32 with batch 128, and at 224x224 with batch
16; random weights, 10 classes, random data) it times, in interleaved rounds on one batch:

* ``float``: ``make_train_step`` on the float model (the reference);
* ``float_keras_batch_norm``: the same step traced with Keras' own BatchNormalization ops
  instead of the fused kernel that every step here uses
  (:mod:`metamix_tf.training.batch_norm`): the float step of a plain Keras training loop;
* ``float_keras_optimizer``: the float step with Keras' own Adam update ops instead of the
  fused update kernels (:mod:`metamix_tf.training.optimizers`);
* ``selected``: ``make_train_step`` at fixed 4-bit activations (8 for the first and last
  layer) with 4-bit weights: weight training;
* ``selected_bias_grid``: ``selected`` with every folded bias on the int8 export's int32
  grid (:class:`~metamix_tf.export.bias_grid.BiasGrid` around the same step: weight
  training's default; its graph ops are the wrapper's own, the step being a call in it);
* ``joint``: ``make_joint_step``, the mixture of the 3 candidates (2/4/8) with weights, step
  sizes and bit logits trained together (the EdMIPS/DNAS search step; the mixture step);
* ``metamix``: one MetaMix iteration after the warm-up, ``make_meta_step`` (K = 3 full
  passes, the paper's bit-meta) then ``make_search_step`` (bit-search);
* ``metamix_split``: the same with ``meta_batch="split"`` (one pass, the batch cut into one
  part per candidate);
* ``bit_meta``: the bit-meta step of ``metamix`` alone (K full passes), against K times the
  ``selected`` step (the same function as ``metamix``'s, so its first call was paid there).

``--breakdown`` adds two halves of ``selected``: ``activations_only`` (the same step with
weight quantization off) and ``weights_only`` (every activation quantizer in ``"float"``
mode), to show which quantizers the selected step's overhead comes from, and a diagnostic
that is not a training step: ``activations_forward_only``, ``activations_only`` with each
quantizer's backward replaced by a pass-through of ``dy`` (no step-size gradient), so the
forward kernels' share of the overhead shows. With the native kernels it also times
``selected_unfolded`` and ``joint_unfolded``: the same steps with no ReLU6 folded into the
quantizer after it (``ops._folded_input`` off), the fold's effect side by side.

Each variant's first call is timed on its own (tracing, graph optimization and XLA kernel
compilation: what a training phase pays once, in its first epoch), and the operations of its
traced graph are counted (tracing time grows with them). A variant's time in a round is the
median of ``--steps`` calls; its ratios to ``float``, ``selected`` and ``joint`` are taken
within the round (slow drifts of the machine's load cancel), and the median over rounds is
reported beside the targets of issue 14. Run it on a quiet machine.

``--save FILE`` writes the ratios as JSON; ``--check FILE`` compares a run with such a
file and exits 1 if a ratio grew by more than ``--tolerance`` (a regression guard, run by
hand, not in CI: timings are not tests).

Usage: ``python benchmarks/step_overhead.py [--settings 32x128,224x16] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import metamix_tf  # noqa: E402
from metamix_tf import run_files  # noqa: E402
from metamix_tf.export.bias_grid import BiasGrid  # noqa: E402
from metamix_tf.quant import native, ops  # noqa: E402
from metamix_tf.quant.cost import CostModel  # noqa: E402
from metamix_tf.training import optimizers, steps  # noqa: E402

CANDIDATES = (2, 4, 8)
# issue 14's targets: (the variant it is compared with, the largest ratio)
TARGETS = {"selected": ("float", 1.15), "joint": ("float", 1.30),
           "metamix": ("joint", 1.5), "metamix_split": ("joint", 1.5),
           "bit_meta": ("selected", float(len(CANDIDATES)))}
BASES = ("float", "selected", "joint")  # the variants every ratio is taken against


def _optimizer(variables, learning_rate=1e-3):
    """The phases' optimizer (``make_optimizer``: Adam, decoupled weight decay)."""
    return optimizers.make_optimizer(learning_rate, variables, weight_decay=1e-5)


def _half_step(strategy, float_model, config, selected, weights: bool):
    """The selected step with only its weight quantizers (``weights``) or only its activation
    quantizers, on a copy of ``selected`` (same bits, steps and weights)."""
    half = metamix_tf.apply(float_model, config)
    half.set_weights(selected.get_weights())
    if weights:
        metamix_tf.enable_weight_quantization(half)

        def configure():
            metamix_tf.set_mode(half, "float")
    else:
        configure = steps.fixed_bits(half, metamix_tf.get_bits(selected))
    groups = metamix_tf.variable_groups(half)
    return steps.make_train_step(strategy, half, _optimizer(groups.weights_and_steps),
                                 groups.weights_and_steps, configure=configure)


def _forward_only(forward):
    """``forward(x, step, qn, qp)`` with a pass-through backward: the diagnostic that stands
    in for ``ops._lsq_quantize`` / ``ops._lsq_quantize_native``."""

    @tf.custom_gradient
    def quantize(x, step, qn, qp, grad_scale):
        def grad(dy):
            return (dy, tf.zeros_like(step), tf.zeros_like(qn), tf.zeros_like(qp),
                    tf.zeros_like(grad_scale))

        return forward(x, step, qn, qp), grad

    return quantize


def _native_forward(x, step, qn, qp):
    return native.library().metamix_lsq_forward(x, ops._native_step(step), qn, qp)


def _unfolded(x):
    """``ops._folded_input`` that folds nothing (the diagnostic's replacement)."""
    return x, "none"


def traced_with(fn, replacements: dict, module=ops):
    """``fn`` traced (at its first call) with each ``<module>.<name>`` (default: of
    ``metamix_tf.quant.ops``) in ``replacements`` replaced by its value (a diagnostic:
    swapped around every call, read only while tracing)."""

    def call(images, labels):
        originals = {name: getattr(module, name) for name in replacements}
        for name, replacement in replacements.items():
            setattr(module, name, replacement)
        try:
            return fn(images, labels)
        finally:
            for name, original in originals.items():
                setattr(module, name, original)

    return call


def random_batch(input_size: int, batch: int):
    """The benchmarks' batch (Keras and numpy seeded): images in [-1, 1], 10-class labels."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (batch, input_size, input_size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, batch), tf.int32)
    return images, labels


def mobilenet_v2(input_size: int) -> keras.Model:
    """A random-weight MobileNetV2 with 10 classes and logits."""
    return keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3), weights=None, classes=10,
        classifier_activation=None)


def float_step(strategy, input_size: int):
    """:func:`mobilenet_v2` and its float ``make_train_step``."""
    float_model = mobilenet_v2(input_size)
    return float_model, steps.make_train_step(strategy, float_model,
                                              _optimizer(float_model.trainable_variables),
                                              float_model.trainable_variables)


def calibrated(strategy, float_model, config, images, labels):
    """``metamix_tf.apply(float_model, config)`` with its step sizes calibrated on the batch."""
    model = metamix_tf.apply(float_model, config)
    steps.make_calibrate_step(strategy, model)(images, labels)
    return model


def selected_step(strategy, model):
    """``model`` set to 4-bit searchable activations with weight quantization on, and its
    weight-training step at those bits (``make_train_step``)."""
    metamix_tf.select_bits(model, {layer.name: 4 for layer in metamix_tf.quant_layers(model)
                                   if layer.input_quantizer.searchable})
    metamix_tf.enable_weight_quantization(model)
    groups = metamix_tf.variable_groups(model)
    return steps.make_train_step(
        strategy, model, _optimizer(groups.weights_and_steps), groups.weights_and_steps,
        configure=steps.fixed_bits(model, metamix_tf.get_bits(model)))


def joint_step(strategy, model):
    """The joint (mixture) search step of ``model`` at the uniform 4-bit GBOPs target."""
    groups = metamix_tf.variable_groups(model)
    cost = CostModel(model)
    return steps.make_joint_step(
        strategy, model, _optimizer(groups.weights_and_steps), groups.weights_and_steps,
        _optimizer(groups.alphas), groups.alphas, cost, cost.uniform_gbops(4), 4.0)


def metamix_steps(strategy, model, meta_batch: str):
    """``(bit_meta, iteration)``: ``model``'s MetaMix bit-meta step (``make_meta_step``) and
    one iteration after the warm-up, bit-meta then bit-search (``make_search_step``) at the
    uniform 4-bit GBOPs target."""
    groups = metamix_tf.variable_groups(model)
    cost = CostModel(model)
    meta = steps.make_meta_step(strategy, model, _optimizer(groups.weights_and_steps),
                                groups.weights_and_steps, CANDIDATES, meta_batch=meta_batch)
    search = steps.make_search_step(strategy, model, _optimizer(groups.alphas), groups.alphas,
                                    cost, cost.uniform_gbops(4), 4.0)

    def iteration(x, y):
        meta(x, y)
        return search(x, y)

    return meta, iteration


def build_steps(input_size: int, images, labels, breakdown: bool = False) -> dict:
    """``name -> callable(images, labels)`` built with the library's step factories."""
    strategy = tf.distribute.get_strategy()
    float_model, float_train = float_step(strategy, input_size)
    config = metamix_tf.QuantConfig(candidate_bits=CANDIDATES, weight_bits=4)
    out = {"float": float_train, "float_keras_batch_norm": traced_with(
        float_step(strategy, input_size)[1],
        {"fused_batch_norm": lambda model: contextlib.nullcontext()}, module=steps),
        "float_keras_optimizer": traced_with(float_step(strategy, input_size)[1],
                                             {"_fusable": lambda *args: False},
                                             module=optimizers)}
    selected = calibrated(strategy, float_model, config, images, labels)
    out["selected"] = selected_step(strategy, selected)
    out["selected_bias_grid"] = BiasGrid(selected).around(out["selected"])
    if breakdown:
        out["activations_only"] = _half_step(strategy, float_model, config, selected, False)
        out["weights_only"] = _half_step(strategy, float_model, config, selected, True)
        out["activations_forward_only"] = traced_with(
            _half_step(strategy, float_model, config, selected, False),
            {"_lsq_quantize": _forward_only(ops._quantize_forward),
             "_lsq_quantize_native": _forward_only(_native_forward)})

    out["joint"] = joint_step(strategy, calibrated(strategy, float_model, config, images, labels))
    if breakdown and native.library() is not None:
        unfolded = {"_folded_input": _unfolded}
        for name, make in (("selected", selected_step), ("joint", joint_step)):
            out[f"{name}_unfolded"] = traced_with(
                make(strategy, calibrated(strategy, float_model, config, images, labels)),
                unfolded)
    for name, meta_batch in (("metamix", "full"), ("metamix_split", "split")):
        model = calibrated(strategy, float_model, config, images, labels)
        meta, out[name] = metamix_steps(strategy, model, meta_batch)
        if meta_batch == "full":
            out["bit_meta"] = meta
    return out


def _sync(result) -> None:
    for value in result.values():
        value.numpy()


def timed_calls(fn, images, labels, calls: int) -> list[float]:
    """Seconds of each of ``calls`` synchronous calls of ``fn(images, labels)``."""
    taken = []
    for _ in range(calls):
        start = time.perf_counter()
        _sync(fn(images, labels))
        taken.append(time.perf_counter() - start)
    return taken


def interleaved(fns: dict, images, labels, rounds: int, calls: int, bases) -> tuple:
    """``(times, ratios)``: every call's seconds per variant, and per round each variant's
    ratio to each of ``bases`` (``{name: {base: [one per round]}}``); each round starts one
    variant later, so slow drifts of the machine's load cancel in the ratios."""
    names = list(fns)
    times = {name: [] for name in names}
    ratios = {name: {base: [] for base in bases} for name in names}
    for r in range(rounds):
        this_round = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            taken = timed_calls(fns[name], images, labels, calls)
            this_round[name] = statistics.median(taken)
            times[name].extend(taken)
        for name in names:
            for base in bases:
                ratios[name][base].append(this_round[name] / this_round[base])
    return times, ratios


def measure(input_size: int, batch: int, rounds: int, calls: int, warmup: int,
            breakdown: bool = False) -> dict:
    """``{variant: {"ms", <base>...}}``: median ms per call and median ratios to each of
    :data:`BASES`."""
    images, labels = random_batch(input_size, batch)
    fns = build_steps(input_size, images, labels, breakdown)
    first_call, graph_ops = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        _sync(fn(images, labels))  # tracing, graph optimization, XLA kernels
        first_call[name] = time.perf_counter() - start
        if hasattr(fn, "get_concrete_function"):  # one tf.function (not metamix's two)
            graph_ops[name] = len(fn.get_concrete_function(images, labels).graph
                                  .get_operations())
        for _ in range(warmup - 1):
            _sync(fn(images, labels))
    names = list(fns)
    times, ratios = interleaved(fns, images, labels, rounds, calls, BASES)
    return {name: {"ms": statistics.median(times[name]) * 1e3,
                   **{base: statistics.median(v) for base, v in ratios[name].items()},
                   "first_call_s": first_call[name], "graph_ops": graph_ops.get(name)}
            for name in names}


def _table(setting: str, result: dict) -> None:
    print(f"\n{setting}")
    print("| variant | ms/step (median) | vs float | vs selected | vs joint | target "
          "| first call (s) | graph ops |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name, r in result.items():
        base_target = TARGETS.get(name)
        target = f"<= {base_target[1]:.2f}x {base_target[0]}" if base_target else "-"
        print(f"| {name} | {r['ms']:.0f} | {r['float']:.2f}x | {r['selected']:.2f}x "
              f"| {r['joint']:.2f}x | {target} "
              f"| {r['first_call_s']:.1f} | {r.get('graph_ops') or '-'} |")


def _check(results: dict, path: str, tolerance: float) -> int:
    with open(path) as f:
        committed = json.load(f)["results"]
    failed = 0
    for setting, variants in results.items():
        for name, base_target in TARGETS.items():
            base = base_target[0]
            old = committed.get(setting, {}).get(name, {}).get(base)
            new = variants[name][base]
            if old is not None and new > old * (1 + tolerance):
                print(f"regression: {setting} {name} vs {base}: {new:.2f}x > committed "
                      f"{old:.2f}x (+{tolerance:.0%})")
                failed = 1
    print("regression check:", "FAILED" if failed else f"ok against {path}")
    return failed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="32x128,224x16",
                        help="comma-separated <input size>x<batch>")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="calls per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--save", help="write the ratios to this JSON file")
    parser.add_argument("--check", help="compare with the ratios in this JSON file")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the selected step's activation and weight halves "
                             "and its activation quantizers' forward kernels alone")
    args = parser.parse_args(argv)

    results = {}
    for setting in args.settings.split(","):
        size, batch = (int(v) for v in setting.split("x"))
        results[setting] = measure(size, batch, args.rounds, args.steps, args.warmup,
                                   args.breakdown)
    kernels = ("native C++" if native.library() is not None
               else "XLA (METAMIX_TF_NATIVE_OPS=0 or no compiler)")
    header = (f"MobileNetV2, candidates {CANDIDATES}, {os.cpu_count()} CPU cores "
              f"({run_files.cpu_model()}), TF {tf.__version__}, Keras {keras.__version__}, "
              f"{kernels} quantizer kernels; "
              f"{args.rounds} interleaved rounds x {args.steps} calls; load average at the "
              f"end {os.getloadavg()[0]:.1f}")
    print(header)
    for setting, result in results.items():
        _table(f"{setting} (input side x batch)", result)
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"machine": header, "command": " ".join(sys.argv), "results": results},
                      f, indent=1)
    if args.check:
        sys.exit(_check(results, args.check, args.tolerance))
    return results


if __name__ == "__main__":
    main()
