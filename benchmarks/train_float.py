"""Float training of a zoo model with the pretrain settings of a config, SGD included.

    unzip -q ../shared/data/cifar10-jpeg.zip -d /tmp/cifar10
    python benchmarks/train_float.py --config=configs/cifar10_resnet20.yaml \\
        --dataset=folder:/tmp/cifar10 --model_dir=runs/float_cifar10_resnet20 \\
        --out=weights/cifar10_resnet20

What ``train.py --phase=pretrain`` does (same data pipeline, steps, epoch loop, per-epoch
checkpoints; the same command resumes), with the optimizer the ``pretrain`` section asks for
(``optimizer: sgd``, ``momentum``, ``nesterov``, coupled ``l2``, ``warmup_epochs``), which
``pipeline._pretrain`` does not pass on yet. Evaluates on the whole eval split every epoch
and writes ``<out>.weights.h5`` (load with ``models.build(name, weights=...)`` or
``--weights``) and ``<out>.json`` (accuracy, epochs, wall time, command, config).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from metamix_tf import config as config_lib  # noqa: E402
from metamix_tf import data as data_lib  # noqa: E402
from metamix_tf import models  # noqa: E402
from metamix_tf.analysis import evaluation  # noqa: E402
from metamix_tf.training import averaging, optimizers, steps, trainer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("config", [], "YAML config file(s), applied in order.")
flags.DEFINE_string("dataset", None, "Overrides data.dataset, e.g. folder:/tmp/cifar10.")
flags.DEFINE_string("model_dir", "runs/float", "Checkpoints and history (resume from here).")
flags.DEFINE_string("out", None, "Path prefix of the .weights.h5 and .json written at the end.")
flags.DEFINE_integer("epochs", None, "Overrides pretrain.epochs.")
flags.DEFINE_string("init_weights", None,
                    "A .weights.h5 to start from (a warm restart: a new learning-rate cycle).")
flags.DEFINE_integer("swa_from", 0,
                     "Stochastic weight averaging (SWA): from this epoch (1-based) on, each "
                     "epoch's end weights join a running mean that is the result (0: off).")
flags.DEFINE_string("swa_continue", None,
                    "SWA: path prefix of an earlier SWA result (.weights.h5 and .json): the "
                    "mean starts there, counting its snapshots, so the result averages both "
                    "runs' snapshots (start this run from the same weights).")
flags.DEFINE_boolean("constant_lr", False,
                     "Hold the learning rate after the warm-up instead of the cosine decay "
                     "(SWA's constant schedule).")
flags.DEFINE_integer("bn_batches", 200,
                     "SWA: training batches that re-estimate BatchNorm at the mean weights.")
flags.DEFINE_integer("max_train_examples", None, "A stratified subset (smoke checks).")
flags.DEFINE_integer("max_eval_examples", None, "A stratified eval subset (smoke checks only).")


def _no_decay(variables) -> list:
    return [v for v in variables if len(v.shape) <= 1]


def _continue_average(average, prefix, name, image_shape, num_classes) -> None:
    """Starts ``average`` at the SWA mean stored under ``prefix`` with its snapshot count."""
    missing = [prefix + ext for ext in (".json", ".weights.h5") if not os.path.exists(prefix + ext)]
    if missing:
        raise FileNotFoundError(f"--swa_continue={prefix}: {missing} not found; give the --out "
                                "prefix of an earlier run trained with --swa_from.")
    with open(prefix + ".json") as f:
        count = (json.load(f).get("swa") or {}).get("snapshots")
    if not count:
        raise ValueError(f"--swa_continue={prefix}: {prefix}.json records no SWA snapshots; "
                         "give the prefix of a run trained with --swa_from.")
    earlier = models.build(name, image_shape, num_classes,
                           weights=prefix + ".weights.h5")
    average.start_from([v.value for v in earlier.trainable_variables], count)
    print(f"SWA continues {prefix}: {count} snapshots averaged already", flush=True)


def main(argv):
    del argv
    if FLAGS.swa_continue and not FLAGS.swa_from:
        raise ValueError("--swa_continue continues an SWA mean: give --swa_from too.")
    config = config_lib.load(FLAGS.config)
    if FLAGS.dataset:
        config.data.dataset = FLAGS.dataset
    if FLAGS.epochs is not None:
        config.pretrain.epochs = FLAGS.epochs
    config.data.max_train_examples = FLAGS.max_train_examples
    config.data.max_eval_examples = FLAGS.max_eval_examples
    p, m = config.pretrain, config.model
    keras.utils.set_random_seed(config.seed)
    strategy = tf.distribute.get_strategy()
    data = data_lib.load(config.data, image_size=m.input_size,
                         preprocess=models.preprocess_input(m.name))
    steps_per_epoch = data.train_size // config.data.batch_size
    os.makedirs(FLAGS.model_dir, exist_ok=True)
    config_lib.save(config, os.path.join(FLAGS.model_dir, "config.yaml"))
    print(f"{m.name} on {data.name}: {data.train_size} train / {data.eval_size} eval images, "
          f"{p.epochs} epochs x {steps_per_epoch} steps, {p.optimizer} lr {p.learning_rate}",
          flush=True)
    model = models.build(m.name, data.image_shape, data.num_classes,
                         weights=FLAGS.init_weights, bn_momentum=m.bn_momentum,
                         dropout=m.dropout)
    variables = list(model.trainable_variables)
    total = p.epochs * steps_per_epoch
    schedule = optimizers.cosine_schedule(p.learning_rate, total,
                                          round(p.warmup_epochs * steps_per_epoch),
                                          final_fraction=1.0 if FLAGS.constant_lr else 0.0)
    optimizer = optimizers.make_optimizer(
        schedule, variables, weight_decay=p.weight_decay, l2=p.l2, kind=p.optimizer,
        momentum=p.momentum, nesterov=p.nesterov, no_decay=_no_decay(variables))
    step = steps.make_train_step(strategy, model, optimizer, variables,
                                 label_smoothing=p.label_smoothing)
    eval_fn = steps.make_eval_step(strategy, model)
    eval_dataset = strategy.experimental_distribute_dataset(data.eval)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    hooks = []
    if FLAGS.swa_from:
        average = averaging.WeightAverage(variables)
        if FLAGS.swa_continue:
            _continue_average(average, FLAGS.swa_continue, m.name, data.image_shape,
                              data.num_classes)
        checkpoint.swa = average  # a resumed run continues the same mean

        def snapshot(epoch):  # before the epoch's checkpoint is written
            if epoch + 1 >= FLAGS.swa_from:
                average.update()

        hooks.append(trainer.Hooks(before_eval=snapshot))
    phase = trainer.Phase("pretrain", p.epochs, epoch_step=lambda epoch: step, eval_fn=eval_fn,
                          checkpoint=checkpoint, hooks=hooks)
    result = trainer.run_epochs(phase, trainer.Loop(
        strategy, trainer.EpochIterators(strategy, data.train), steps_per_epoch,
        eval_dataset=eval_dataset,
        checkpoint_dir=os.path.join(FLAGS.model_dir, "ckpt", "pretrain"),
        log_dir=os.path.join(FLAGS.model_dir, "logs", "pretrain")))
    metrics = trainer.evaluate(strategy, eval_fn, eval_dataset)
    swa = None
    if FLAGS.swa_from:
        swa = {"from_epoch": FLAGS.swa_from, "continues": FLAGS.swa_continue,
               "snapshots": int(average.count.numpy()),
               "last_epoch_val_acc": metrics["val_acc"], "bn_batches": FLAGS.bn_batches}
        average.assign_to()
        evaluation.reestimate_batch_norm(model, data.train, bits={},
                                         num_batches=FLAGS.bn_batches)
        metrics = trainer.evaluate(strategy, eval_fn, eval_dataset)
        print(f"SWA of {swa['snapshots']} epoch-end snapshots: val_acc "
              f"{metrics['val_acc']:.4f} (the last epoch's weights: "
              f"{swa['last_epoch_val_acc']:.4f})", flush=True)
    print(f"done: {p.epochs} epochs, val_acc {metrics['val_acc']:.4f} on {data.eval_size} "
          f"images, wall time {result.wall_time_s:.0f} s", flush=True)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        model.save_weights(FLAGS.out + ".weights.h5")
        record = {
            "model": m.name, "dataset": data.name, "eval_images": data.eval_size,
            "train_images": data.train_size, "epochs": p.epochs,
            "init_weights": FLAGS.init_weights, "constant_lr": FLAGS.constant_lr, "swa": swa,
            "val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"],
            "wall_time_s": round(result.wall_time_s, 1),
            "history": [{k: v for k, v in h.items() if not isinstance(v, dict)}
                        for h in result.history],
            "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1],
                                                         *sys.argv]),
            "config": config_lib.to_dict(config),
            "machine": {"platform": platform.platform(), "tensorflow": tf.__version__,
                        "keras": keras.__version__, "cpu_count": os.cpu_count()},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(FLAGS.out + ".json", "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    app.run(main)
