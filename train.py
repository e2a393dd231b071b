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
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import yaml  # noqa: E402
from absl import app, flags  # noqa: E402

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


def _parse(raw: str):
    """A ``--set`` value: YAML, with numbers like ``6e-3`` (a string to YAML 1.1) as floats."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _nested(key: str, value) -> dict:
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def overrides_from_flags() -> dict:
    """The config overrides of ``--set`` and the dedicated flags, as a nested dict."""
    from metamix_tf.config import merge

    values: dict = {}
    for item in FLAGS.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes key.sub=value. Received: --set={item!r}")
        values = merge(values, _nested(key.strip(), _parse(raw)))
    direct = {
        "model.name": FLAGS.model, "data.dataset": FLAGS.dataset,
        "data.data_dir": FLAGS.data_dir, "model.weights": FLAGS.weights,
        "search.searcher": FLAGS.searcher, "search.uniform_bits": FLAGS.bits,
        "data.batch_size": FLAGS.batch_size, "seed": FLAGS.seed, "data.seed": FLAGS.seed,
        "search.target_gbops": FLAGS.target_gbops,
        "search.target_avg_bits": FLAGS.target_avg_bits,
    }
    for phase in ("pretrain", "search", "finetune"):
        value = FLAGS[f"{phase}_epochs"].value
        direct[f"{phase}.epochs"] = FLAGS.epochs if value is None else value
    if FLAGS.teacher is not None:
        direct["search.teacher"] = direct["finetune.teacher"] = FLAGS.teacher
    for key, value in direct.items():
        if value is not None:
            values = merge(values, _nested(key, value))
    if FLAGS.target_avg_bits is not None and FLAGS.target_gbops is None:
        # An average bit-width on the command line wins over a config's GBOPs target.
        values = merge(values, _nested("search.target_gbops", None))
    return values


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from metamix_tf import config as config_lib
    from metamix_tf import pipeline
    from metamix_tf.trainer import NonFiniteLossError

    try:
        config = config_lib.load(FLAGS.config, overrides_from_flags())
        if FLAGS.model_dir:
            config.model_dir = FLAGS.model_dir
        elif config.model_dir == config_lib.ExperimentConfig().model_dir:
            config.model_dir = pipeline.default_model_dir(config.model.name,
                                                          config.data.dataset)
        summary = pipeline.run(config, FLAGS.phase, verbose=not FLAGS.quiet,
                               overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, RuntimeError) as err:  # NaN loss; TFDS cannot download
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    keys = ("float_val_acc", "search_val_acc", "final_val_acc", "gbops", "target_gbops",
            "avg_activation_bits", "total_wall_time_s")
    line = ", ".join(f"{k} {summary[k]:.4f}" for k in keys if k in summary)
    print(f"done: {config.model_dir}: {line}")


if __name__ == "__main__":
    app.run(main)
