"""INT4 weights and integer I/O on a trained run: the numbers of the README's deploy table.

    python benchmarks/deploy_int4.py --model_dir=runs/mobilenet_v2-mnist_embedded

Copies the run (config.yaml, bits.json, final.keras) to ``--output_dir``, moves its folded
biases onto the int32 grid of the "int4" storage (``graph.snap_biases(model, "int4")``: unit
``input_step * learned weight step``, what training does when it targets that storage; a run
trained for "spread" has its biases on a finer grid), then exports it with
``weight_storage="int4"`` and ``integer_io=("uint8",)`` and prints the report. Writes
``deploy_int4.json`` (the snap and the export report) to ``--output_dir``.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory of `python train.py --phase=all`.")
flags.DEFINE_string("output_dir", "/tmp/metamix_deploy_int4", "Where the snapped run and "
                    "its export go.")
flags.DEFINE_integer("max_eval_examples", 5000, "Evaluation images used for verification.")
flags.DEFINE_integer("latency_rounds", 5, "Interleaved latency rounds.")


def main(argv):
    del argv
    from metamix_tf.export import graph, run

    source = run.load_run(FLAGS.model_dir or run.latest_run())
    target = os.path.join(FLAGS.output_dir, "run")
    os.makedirs(target, exist_ok=True)
    for name in ("config.yaml", "bits.json"):
        if os.path.exists(os.path.join(source.model_dir, name)):
            shutil.copy(os.path.join(source.model_dir, name), target)
    snap = graph.snap_biases(source.model, weight_storage="int4")
    source.model.save(os.path.join(target, "final.keras"))
    report = run.export_run(target, output_dir=os.path.join(FLAGS.output_dir, "export"),
                            max_eval_examples=FLAGS.max_eval_examples, weight_storage="int4",
                            integer_io=("uint8",), tensor_costs=False,
                            latency_rounds=FLAGS.latency_rounds)
    with open(os.path.join(FLAGS.output_dir, "deploy_int4.json"), "w") as f:
        json.dump({"source_run": source.model_dir, "snap_biases_int4": snap, "report": report},
                  f, indent=1, default=str)
    print(f"Biases moved onto the int4 storage's grid: {snap['layers']} layers, largest shift "
          f"{snap['max_shift_units']:.2f} units")
    print(run.format_report(report))


if __name__ == "__main__":
    app.run(main)
