"""MetaMix training from the command line: float pre-training, bit selection, weight training.

    python train.py --model=mobilenet_v2 --phase=all

runs every phase on the embedded MNIST digits with the defaults of ``metamix_tf.config``
(the same as ``configs/demo_mnist.yaml``) and writes checkpoints, ``bits.json``,
``bits.png``, ``final.keras``, ``summary.json`` and TensorBoard logs to ``--model_dir``
(default ``runs/<model>-<dataset>``). The same command run again resumes where it stopped.

Settings are applied in order: defaults in code, each ``--config`` YAML file, each
``--set key.sub=value``, then the dedicated flags below.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from metamix_tf import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Network: mobilenet_v2, mobilenet_v3_small, "
                    "mobilenet_v3_large, resnet18, resnet50 (default: config model.name).")
flags.DEFINE_enum("phase", "all", ["pretrain", "search", "finetune", "all"], "Phase(s) to run.")
flags.DEFINE_string("dataset", None, "mnist_embedded | folder:PATH | a TFDS name.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_multi_string("config", [], "YAML override file(s), applied in order.")
flags.DEFINE_string("model_dir", None, "Run directory (default runs/<model>-<dataset>).")
flags.DEFINE_string("weights", None, "Pretrained float weights (.keras / .weights.h5 / "
                    "'imagenet'); skips pre-training.")
flags.DEFINE_enum("searcher", None, ["metamix", "joint", "none"],
                  "Bit selection: metamix, joint (EdMIPS/DNAS baseline) or none (uniform LSQ).")
flags.DEFINE_integer("bits", None, "Uniform activation bits for --searcher=none.")
flags.DEFINE_float("target_gbops", None, "GBOPs target of the search.")
flags.DEFINE_float("target_avg_bits", None, "GBOPs target as an average activation bit-width.")
flags.DEFINE_integer("epochs", None, "Epochs of every phase (overrides the config).")
flags.DEFINE_integer("pretrain_epochs", None, "Float pre-training epochs.")
flags.DEFINE_integer("search_epochs", None, "Bit-selection epochs (warm-up included).")
flags.DEFINE_integer("finetune_epochs", None, "Weight-training epochs.")
flags.DEFINE_integer("batch_size", None, "Global training batch size.")
flags.DEFINE_string("teacher", None, "KD teacher for search and weight training: 'self' "
                    "(the float model) or a .keras file.")
flags.DEFINE_integer("seed", None, "Seed of the run and of the data order.")
flags.DEFINE_multi_string("set", [], "Dotted override, e.g. --set search.cost_weight=8 "
                          "(value parsed as YAML).")
flags.DEFINE_bool("quiet", False, "Only errors and the final line.")
flags.DEFINE_bool("overwrite", False, "Redo the phases whose results in --model_dir were made "
                  "with other settings, and the phases after them (default: refuse).")


def _flag_values() -> dict:
    names = ("model", "dataset", "data_dir", "weights", "searcher", "bits", "batch_size",
             "seed", "target_gbops", "target_avg_bits", "epochs", "pretrain_epochs",
             "search_epochs", "finetune_epochs", "teacher")
    return {name: FLAGS[name].value for name in names}


def main(argv):
    if len(argv) > 1:
        cli.error_exit(argv[0], ValueError(f"Unexpected arguments; flags take --name=value. "
                                           f"Received: args={argv[1:]}"))
    try:
        config = cli.resolve_config(FLAGS.config, FLAGS.set, _flag_values(), FLAGS.model_dir)
    except (ValueError, FileNotFoundError) as err:
        cli.error_exit(argv[0], err)
    from metamix_tf import pipeline
    from metamix_tf.training.trainer import NonFiniteLossError

    try:
        summary = pipeline.run(config, FLAGS.phase, verbose=not FLAGS.quiet,
                               overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as err:
        cli.error_exit(argv[0], err)
    except (NonFiniteLossError, RuntimeError) as err:  # NaN loss; TFDS cannot download
        cli.error_exit(argv[0], err, code=1)
    keys = ("float_val_acc", "search_val_acc", "final_val_acc", "gbops", "target_gbops",
            "avg_activation_bits", "total_wall_time_s")
    line = ", ".join(f"{k} {summary[k]:.4f}" for k in keys if k in summary)
    if not FLAGS.quiet:
        print("where the time went (seconds):\n" + pipeline.format_profile(summary))
    print(f"done: {config.model_dir}: {line}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser)
