"""One process of the multi-worker test: ``python multi_worker_run.py MODEL_DIR OUT``.

Runs every phase of a small tiny-net run in ``MODEL_DIR`` (the strategy comes from
``TF_CONFIG``) and writes the final model's weights and the summary to ``OUT.npz`` and
``OUT.json``. ``--mirrored`` instead runs one process with two replicas on two logical CPUs
(the same split of each global batch as two workers). The test imports it for the
in-process reference.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pipeline import tiny_config, tiny_net  # noqa: E402

from metamix_tf import pipeline  # noqa: E402

GLOBAL_BATCH = 64


def small_config(model_dir):
    return tiny_config(model_dir, data={"max_train_examples": 64, "max_eval_examples": 64,
                                        "batch_size": GLOBAL_BATCH},
                       pretrain={"epochs": 1}, search={"epochs": 2, "warmup_epochs": 1},
                       finetune={"epochs": 1})


def run_and_capture(model_dir, **kwargs) -> tuple:
    """(summary, final weights): the weights of the last model the run loaded (weight
    training loads ``search.keras`` and trains it), read after the run."""
    loaded = []
    load_model = keras.saving.load_model

    def capture(*args, **kw):
        loaded.append(load_model(*args, **kw))
        return loaded[-1]

    keras.saving.load_model = capture
    try:
        summary = pipeline.run(small_config(model_dir), model_fn=tiny_net, verbose=False,
                               **kwargs)
    finally:
        keras.saving.load_model = load_model
    weights = {f"{i}:{w.path}": keras.ops.convert_to_numpy(w)
               for i, w in enumerate(loaded[-1].weights)}
    return summary, weights


def main(model_dir, out, *options):
    strategy = None
    if "--mirrored" in options:
        import tensorflow as tf

        from metamix_tf.training import distribute

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = distribute.mirrored_strategy(
            [d.name for d in tf.config.list_logical_devices("CPU")][:2])
    summary, weights = run_and_capture(model_dir, strategy=strategy)
    np.savez(out + ".npz", **weights)
    with open(out + ".json", "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
