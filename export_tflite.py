"""Export a trained MetaMix run to TFLite for mobile NPUs and GPUs, with verification.

    python export_tflite.py                      # the latest run under runs/
    python export_tflite.py --model_dir=runs/mobilenet_v2-mnist_embedded --format=int8

writes ``<model>_int8.tflite`` (int8, each layer exactly on its searched b-bit grid),
``<model>_float16.tflite`` and ``<model>_float32.tflite`` (the same fake-quantized network
for GPU delegates), with ``--weight_storage=int4`` ``<model>_int4.tflite`` (INT4 kernels),
``<model>.encodings.json`` (per-tensor bit-widths and scales for an NPU
compiler), ``<model>_inference.keras`` and ``saved_model/`` (the inference graph) and
``export_report.json`` (LiteRT verification against the Keras model) to ``--output_dir``
(default ``<model_dir>/export``), and prints a short table.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from metamix_tf import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory (default: the latest run under "
                    "--run_root).")
flags.DEFINE_string("run_root", "runs", "Where to look for the latest run.")
flags.DEFINE_string("output_dir", None, "Output folder (default <model_dir>/export).")
flags.DEFINE_list("format", ["int8", "float16", "float32"],
                  "Comma list of int8, float16, float32.")
flags.DEFINE_bool("verify", True, "Run the exported models with the LiteRT interpreter on the "
                  "evaluation split and compare them with the Keras model.")
flags.DEFINE_integer("max_eval_examples", 5000, "Evaluation images used for verification.")
flags.DEFINE_integer("calibration_examples", 1024, "Train images used to calibrate the "
                     "int8 ranges of the tensors the Keras model keeps in float.")
flags.DEFINE_enum("weight_storage", None, ["bits", "spread", "int4"],
                  "Default: the storage the run's biases were trained for "
                  "(finetune.weight_storage, 'spread' unless set). int8 weights: 'bits' "
                  "holds the b-bit integers with the learned per-channel "
                  "steps; 'spread' multiplies them per channel to fill [-127, 127] (same "
                  "weights, finer int32 biases, closer to the Keras model); 'int4' is 'bits' "
                  "and also writes <model>_int4.tflite, every <= 4-bit kernel a packed INT4 "
                  "tensor (needs pip install 'metamix_tf[int4]').")
flags.DEFINE_list("integer_io", [], "Also write the int8 model with integer input and "
                  "output tensors: uint8 and / or int8 (camera pipelines feed uint8).")
flags.DEFINE_bool("tensor_costs", True, "Also measure the agreement each tensor that the "
                  "Keras model keeps in float costs when stored at 8 bits.")
flags.DEFINE_integer("latency_threads", 1, "Interpreter threads for the latency comparison.")
flags.DEFINE_integer("latency_rounds", 5, "Interleaved latency rounds (each model in turn).")


def main(argv):
    if len(argv) > 1:
        cli.error_exit(argv[0], ValueError(f"Unexpected arguments; flags take --name=value. "
                                           f"Received: args={argv[1:]}"))
    logging.set_verbosity(logging.WARNING)  # keep the converter's and SavedModel's chatter out
    from metamix_tf.export import run as export_run

    try:
        report = export_run.export_run(
            model_dir=FLAGS.model_dir, output_dir=FLAGS.output_dir, formats=FLAGS.format,
            verify_models=FLAGS.verify, max_eval_examples=FLAGS.max_eval_examples,
            max_calibration_examples=FLAGS.calibration_examples, run_root=FLAGS.run_root,
            latency_threads=FLAGS.latency_threads, latency_rounds=FLAGS.latency_rounds,
            weight_storage=FLAGS.weight_storage, tensor_costs=FLAGS.tensor_costs,
            integer_io=FLAGS.integer_io)
    except export_run.tflite.ConversionError as e:
        cli.error_exit(argv[0], e, code=1)
    except (export_run.RunError, ValueError, FileNotFoundError) as e:
        cli.error_exit(argv[0], e)
    print(export_run.format_report(report))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser)
