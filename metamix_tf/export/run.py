"""Export of a trained model or a training run directory, with verification.

:func:`export_model` takes a wrapped Keras model (quantizers selected, weight quantization
on) and writes into ``output_dir``:

* ``<name>_int8.tflite``, ``<name>_float16.tflite``, ``<name>_float32.tflite``;
* ``<name>_int4.tflite`` with ``weight_storage="int4"``: the int8 model with its <= 4-bit
  kernels packed as INT4 (:mod:`metamix_tf.export.int4`), verified beside the int8 one;
* ``<name>.encodings.json``: the encodings summary, by Keras layer
  (:mod:`metamix_tf.export.encodings`);
* ``<name>_int8.encodings``: the int8 model's encodings by TFLite tensor name, in the AIMET /
  QNN format (:mod:`metamix_tf.export.aimet`);
* ``<name>_int8_<t>io.tflite`` for each ``t`` in ``integer_io`` (``"uint8"``, ``"int8"``): the
  int8 model with integer input and output tensors and a ``metamix_io`` metadata entry, with
  ``<name>_io.json`` (scales, zero points, normalisation, labels) and ``<name>_labels.txt``
  (:mod:`metamix_tf.export.integer_io`);
* ``<name>_inference.keras`` and ``saved_model/``: the inference graph (the int8-ready,
  converter-native graph when int8 is exported, else the float one);
* ``export_report.json``: verification against the Keras fake-quantized model.

:func:`export_run` does the same for a run directory of :mod:`metamix_tf.pipeline` (its
``config.yaml``, ``bits.json`` and ``final.keras``), with calibration images from the
train split and verification on the eval split.

About 575 lines: the export of a model and of a run directory share their verification and
report (one file keeps the report's fields in one place).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import platform
import tempfile
import time

import keras
import numpy as np

from metamix_tf import config as config_lib
from metamix_tf.export import aimet, graph, int4, kernel_rounding, precision, tflite, verify
from metamix_tf.export import encodings as encodings_lib
from metamix_tf.export import integer_io as integer_io_lib
from metamix_tf.export.bias_grid import STORAGE_GRIDS
from metamix_tf.quant import wrap

__all__ = [
    "DEFAULT_RUN_ROOT",
    "RunError",
    "Run",
    "latest_run",
    "load_run",
    "parse_formats",
    "export_model",
    "export_run",
    "format_report",
]

DEFAULT_RUN_ROOT = "runs"
REPORT_NAME = "export_report.json"


class RunError(ValueError):
    """The run directory is missing something the export needs."""


@dataclasses.dataclass
class Run:
    model_dir: str
    config: config_lib.ExperimentConfig
    bits_info: dict
    model: keras.Model


def parse_formats(formats) -> tuple:
    """``"int8,float32"`` or a sequence -> a tuple of known formats, in canonical order."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(formats or [])
    unknown = [f for f in formats if f not in tflite.FORMATS]
    if unknown or not formats:
        raise ValueError(f"`formats` must be a non-empty subset of {tflite.FORMATS}. "
                         f"Received: formats={formats!r}")
    return tuple(f for f in tflite.FORMATS if f in formats)


def latest_run(run_root: str = DEFAULT_RUN_ROOT) -> str:
    """The run directory under ``run_root`` whose ``final.keras`` (or, lacking one, whose
    ``config.yaml``) is the newest."""
    candidates = [os.path.dirname(p) for p in glob.glob(os.path.join(run_root, "*", "config.yaml"))]
    if not candidates:
        raise RunError(f"No training runs under '{run_root}/' (no */config.yaml). Train one with "
                       "`python train.py --model=mobilenet_v2 --phase=all`, or pass "
                       f"--model_dir. Received: run_root={run_root!r}")

    def stamp(path):
        final = os.path.join(path, "final.keras")
        return os.path.getmtime(final if os.path.exists(final)
                                else os.path.join(path, "config.yaml"))

    return max(candidates, key=stamp)


def load_run(model_dir: str) -> Run:
    """Reads ``config.yaml``, ``bits.json`` and ``final.keras`` of a run, with a message
    naming the fix when one is missing or they disagree."""
    if not os.path.isdir(model_dir):
        raise RunError(f"Run directory not found: {model_dir}. Pass the --model_dir of a "
                       f"`python train.py` run. Received: model_dir={model_dir!r}")
    config_path = os.path.join(model_dir, "config.yaml")
    config = (config_lib.load([config_path]) if os.path.exists(config_path)
              else config_lib.ExperimentConfig(model_dir=model_dir))
    bits_path = os.path.join(model_dir, "bits.json")
    if not os.path.exists(bits_path):
        raise RunError(f"{model_dir} has no bits.json: the bit search has not finished. Run "
                       f"`python train.py --phase=all --model_dir={model_dir}` (or "
                       f"--phase=search, then --phase=finetune). Received: model_dir="
                       f"{model_dir!r}")
    with open(bits_path) as f:
        bits_info = json.load(f)
    final = os.path.join(model_dir, "final.keras")
    if not os.path.exists(final):
        raise RunError(f"{model_dir} has no final.keras: weight training has not finished, "
                       "so there is no checkpoint with quantized weights to export. Run "
                       f"`python train.py --phase=finetune --model_dir={model_dir}` (or "
                       f"--phase=all). Received: model_dir={model_dir!r}")
    import metamix_tf.export.layers  # noqa: F401  (registers the export layers)

    try:
        model = keras.saving.load_model(final, compile=False)
    except Exception as error:  # a truncated or foreign file: zip, h5 and Keras errors alike
        raise RunError(f"{final} is not a readable Keras model ({type(error).__name__}); rerun "
                       f"`python train.py --phase=finetune --model_dir={model_dir}`. "
                       f"Received: model_dir={model_dir!r}") from None
    searched = dict(bits_info.get("bits") or {})
    actual = wrap.get_bits(model)
    unknown = sorted(set(searched) - set(actual))
    differ = sorted(k for k in set(searched) & set(actual) if int(searched[k]) != actual[k])
    if unknown or differ:
        example = unknown[:1] or [f"{differ[0]}: bits.json {searched[differ[0]]} vs "
                                  f"final.keras {actual[differ[0]]}"]
        raise RunError(f"bits.json and final.keras of {model_dir} disagree ({len(unknown)} "
                       f"unknown layer(s), {len(differ)} different bit-width(s), e.g. "
                       f"{example[0]}); rerun --phase=finetune so that both come from the "
                       f"same search. Received: model_dir={model_dir!r}")
    return Run(model_dir=model_dir, config=config, bits_info=bits_info, model=model)


# -- data ------------------------------------------------------------------------------------


def _arrays(dataset, limit: int | None) -> tuple:
    images, labels, count = [], [], 0
    for batch in dataset:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = np.asarray(x, np.float32)
        if limit is not None:
            x = x[:max(0, limit - count)]
        if len(x) == 0:
            break
        images.append(x)
        if y is not None:
            labels.append(np.asarray(y)[:len(x)])
        count += len(x)
        if limit is not None and count >= limit:
            break
    if not images:
        raise ValueError("The dataset yielded no images.")
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def _run_data(run: Run, max_eval_examples: int | None, calibration_examples: int):
    from metamix_tf import data as data_lib
    from metamix_tf import models

    name = run.config.model.name
    preprocess = models.preprocess_input(name) if name in models.MODEL_NAMES else None
    data_config = dataclasses.replace(run.config.data, augment=False)
    image_size = int(run.model.inputs[0].shape[1])
    datasets = data_lib.load(data_config, image_size=image_size, preprocess=preprocess)
    calibration, _ = _arrays(datasets.train, calibration_examples)
    images, labels = _arrays(datasets.eval, max_eval_examples)
    # the float preprocessing the integer-I/O models' input scale applies to
    normalisation = (f"{preprocess.__name__.strip('_')}: {preprocess.__doc__.splitlines()[0]}"
                     if preprocess is not None else None)
    return calibration, images, labels, list(datasets.class_names), normalisation


# -- export ----------------------------------------------------------------------------------


def export_model(model: keras.Model, output_dir: str, formats=tflite.FORMATS, *,
                 name: str = "model", calibration_data=None, eval_images=None,
                 eval_labels=None, verify_models: bool = True, bits_info: dict | None = None,
                 max_calibration_examples: int = 1024, grid_check_examples: int = 64,
                 latency_rounds: int = 5, latency_runs: int = 20,
                 latency_threads: int | None = 1, weight_storage: str = "spread",
                 clamps: str = "saturate", latency_baselines: dict | None = None,
                 tensor_costs: bool = True, report_extra: dict | None = None,
                 integer_io=(), labels: list | None = None, normalisation: str | None = None,
                 log=print) -> dict:
    """Exports ``model`` (module docstring) and, with ``eval_images``, verifies it.

    Args:
      model: a wrapped model from :func:`metamix_tf.apply`; its activation quantizers are
        put in ``"selected"`` mode (the bits in their ``bit_index``).
      formats: subset of :data:`tflite.FORMATS` (a list or ``"int8,float16"``).
      calibration_data: images for the int8 ranges of the tensors Keras keeps in float
        (default: ``eval_images``).
      eval_images / eval_labels: verification data (preprocessed images, int labels).
      verify_models: run the LiteRT checks (needs ``eval_images``).
      bits_info: the run's ``bits.json`` content, copied into the sidecar and the report.
      weight_storage: ``"bits"``, ``"spread"`` or ``"int4"``, see :func:`graph.plan`;
        ``"int4"`` also writes ``<name>_int4.tflite`` (needs the int8 format).
      clamps: how the b-bit bounds are clamped, see :func:`graph.plan` (``"saturate"``:
        by int8 saturation and ReLUs where the graph has them; ``"ops"``: MINIMUM / MAXIMUM).
      latency_baselines: ``{name: .tflite path}``, other models of the same network (e.g.
        a plain post-training int8 one, built by ``benchmarks/export_latency.py``) timed in
        the same interleaved rounds; the report gives their op counts and ``int8_over_<name>``.
      tensor_costs: also measure the agreement each int8-only tensor costs on its own.
      integer_io: ``"uint8"`` and / or ``"int8"``: also write the int8 model with integer
        input and output tensors (needs the int8 format).
      labels / normalisation: class names and the float preprocessing (text), written into
        the integer-I/O models' metadata and ``<name>_io.json``.
      report_extra: entries added to the report.
    Returns the report (also written to ``export_report.json``).
    """
    formats = parse_formats(formats)
    int8 = "int8" in formats
    if weight_storage == "int4" and not int8:
        raise ValueError("weight_storage='int4' packs the int8 model's kernels: add int8 to "
                         f"the formats. Received: formats={formats}")
    integer_io = tuple(integer_io or ())
    if any(t not in ("int8", "uint8") for t in integer_io) or (integer_io and not int8):
        raise ValueError("`integer_io` takes 'int8' / 'uint8' and needs the int8 format. "
                         f"Received: integer_io={integer_io}, formats={formats}")
    # the TFLite files written: the formats, and the INT4-packed int8 model
    outputs = formats + (("int4",) if weight_storage == "int4" else ())
    if model.inputs is None or len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("The export takes a model with one input and one output. "
                         f"Received: inputs={len(model.inputs or [])}")
    began = time.time()
    os.makedirs(output_dir, exist_ok=True)
    wrap.set_mode(model, "selected")
    if calibration_data is None:
        calibration_data = eval_images
    log(f"Planning the inference graph of '{model.name}' ({', '.join(formats)})")
    export_plan = graph.plan(model, calibration_data=calibration_data if int8 else None,
                             int8=int8, max_calibration_examples=max_calibration_examples,
                             weight_storage=weight_storage, clamps=clamps)
    # "float": the fake-quantized network with BatchNorm folded (float TFLite);
    # "int8": the converter-native graph (int8 TFLite, the .keras and SavedModel files);
    # "int8_twin": the same with the biases rounded as the int8 model stores them, a Keras
    # model that computes what the int8 TFLite model computes (verification only).
    graphs = {"float": graph.build(export_plan, native=False)}
    # the Keras model rounds what int8 convs, MEANs and ADDs write as their kernels do
    rounded = kernel_rounding.set_kernel_rounding(model, export_plan) if int8 else []
    if int8:
        graphs["int8"] = graph.build(export_plan, native=True)
        graphs["int8_twin"] = graph.build(graph.with_int32_biases(export_plan), native=True,
                                          name=f"{model.name}_int8_twin", twin=True)
    main = graphs["int8" if int8 else "float"]
    islands = bool(export_plan.float_islands)

    files = {}
    path = lambda suffix: os.path.join(output_dir, f"{name}{suffix}")  # noqa: E731
    files["keras"] = tflite.save_keras(main, path("_inference.keras"))
    files["saved_model"] = tflite.export_saved_model(main, os.path.join(output_dir,
                                                                        "saved_model"))
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            if fmt == "int8":
                source = files["saved_model"]
            else:
                source = os.path.join(tmp, "float_saved_model")
                if not os.path.isdir(source):
                    graphs["float"].export(source, verbose=False)
            log(f"Converting {fmt}")
            data = tflite.convert(source, fmt, float_islands=islands)
            files[fmt] = tflite.write_atomic(path(f"_{fmt}.tflite"), data)
            summaries[fmt] = tflite.graph_summary(data)
            if fmt == "int8" and "int4" in outputs:
                log("Packing the <= 4-bit kernels as INT4")
                packed = int4.pack_int4_weights(data, export_plan)
                files["int4"] = tflite.write_atomic(path("_int4.tflite"), packed.model)
                summaries["int4"] = {**tflite.graph_summary(packed.model),
                                     **packed.to_dict()}
            if fmt == "int8":
                io_specs = {}
                for io_type in integer_io:
                    log(f"Converting int8 with {io_type} input and output")
                    data = tflite.convert(source, "int8", io_type=io_type,
                                          float_islands=islands)
                    spec = integer_io_lib.io_spec(data, labels, normalisation)
                    key = f"int8_{io_type}io"
                    files[key] = tflite.write_atomic(path(f"_{key}.tflite"),
                                                     integer_io_lib.add_metadata(data, spec))
                    io_specs[key] = spec
                if io_specs:
                    files["io_spec"] = encodings_lib.write(path("_io.json"), io_specs)
                if io_specs and labels is not None:
                    files["labels"] = tflite.write_atomic(
                        path("_labels.txt"), "".join(f"{x}\n" for x in labels).encode())
    sidecar = encodings_lib.encodings(export_plan, bits_info,
                                      input_name=main.inputs[0].name if main.inputs else None)
    files["encodings"] = encodings_lib.write(path(".encodings.json"), sidecar)
    if int8:
        files["aimet_encodings"] = encodings_lib.write(
            path("_int8.encodings"), aimet.aimet_encodings(files["int8"], export_plan))

    report = {
        **(report_extra or {}),
        "model": model.name, "formats": list(outputs), "output_dir": output_dir,
        "weight_storage": weight_storage, "clamps": clamps,
        "files": {k: {"path": v, "bytes": _size(v)} for k, v in files.items()},
        "graphs": summaries,
        "bits": {n: p.bits for n, p in export_plan.inputs.items()},
        "gbops": (bits_info or {}).get("gbops"),
        "avg_activation_bits": sidecar["avg_activation_bits"],
        "tensors": {kind: sum(t.kind == kind for t in export_plan.tensors.values())
                    for kind in ("grid", "quantized", "member", "shared", "calibrated")},
        "float_prefix": export_plan.float_prefix,
        "float_islands": export_plan.float_islands,
        "inexact_inputs": [n for n, p in export_plan.inputs.items() if not p.exact],
        "kernel_rounding": rounded,
        "integer_io": io_specs if int8 else {},
        "runtime": _runtime(),
    }
    if verify_models and eval_images is not None:
        int4_layers = [layer for layer, p in summaries.get("int4", {}).get("packed", {}).items()
                       if p["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]  # the pinned kernels
        report["verification"] = _verify(model, graphs, files, outputs, export_plan,
                                         np.asarray(eval_images, np.float32), eval_labels,
                                         grid_check_examples, latency_rounds, latency_runs,
                                         latency_threads, tensor_costs, log,
                                         dict(latency_baselines or {}), int4_layers)
    for key, baseline in (latency_baselines or {}).items():
        report["graphs"][key] = tflite.graph_summary(baseline)
    report["export_seconds"] = round(time.time() - began, 1)
    tflite.write_atomic(os.path.join(output_dir, REPORT_NAME),
                        (json.dumps(report, indent=1, default=_json_default) + "\n").encode())
    return report


def _verify(model, graphs, files, formats, export_plan, images, labels, grid_examples,
            latency_rounds, latency_runs, latency_threads, tensor_costs, log,
            baselines, int4_layers=()) -> dict:
    log(f"Verifying on {len(images)} images")
    reference = verify.keras_logits(model, images)
    out = {"examples": int(len(images)), "reference": "keras fake-quant model",
           "max_abs_reference_logit": float(np.abs(reference).max()),
           "keras_graphs": {}, "tflite": {}}
    if labels is not None:
        out["reference_accuracy"] = float(np.mean(reference.argmax(-1) == labels))
    # Keras evaluates the int8 graph with its fake quants in float math (graph.build's
    # twin): TF's FakeQuant kernel misses by ~1e-5 steps over the wide int8 ranges of the
    # saturating zero points, the converter does not
    evaluated = {**graphs}
    if "int8" in graphs:
        evaluated["int8"] = graph.build(export_plan, native=True, twin=True)
    logits = {key: verify.keras_logits(g, images) for key, g in evaluated.items()}
    for key in graphs:
        out["keras_graphs"][key] = verify.compare(reference, logits[key], labels)
    for fmt in formats:
        result = verify.run_tflite(files[fmt], images)
        out["tflite"][fmt] = verify.compare(reference, result, labels)
        if fmt == "int4":
            # LiteRT runs the INT4 convs on its builtin kernels (XNNPACK takes no INT4
            # filter), which requantize in fixed point: the Keras model rounds those
            # tensors so for this file, then as the int8 file's kernels again
            plain = out["tflite"][fmt]
            try:
                rounded = kernel_rounding.set_kernel_rounding(model, export_plan, int4_layers)
                out["tflite"][fmt] = {
                    **verify.compare(verify.keras_logits(model, images), result, labels),
                    "reference": "keras model with the builtin kernels' rounding for the "
                                 "INT4 convs", "kernel_rounding": rounded,
                    "vs_int8_rounding_keras": plain}
            finally:
                kernel_rounding.set_kernel_rounding(model, export_plan)
        if fmt == "int8":
            out["float64_reference"] = _float64_reference(model, images, reference, result,
                                                          labels, log)
        if fmt in ("int8", "int4"):
            out["tflite"][fmt]["vs_int8_keras_twin"] = verify.compare(
                logits["int8_twin"], result, labels)
        if fmt == "int8":
            for key in [k for k in files if k.startswith("int8_") and k.endswith("io")]:
                io_logits = integer_io_lib.run_integer_io(files[key], images)
                out["tflite"][key] = {**verify.compare(reference, io_logits, labels),
                                      "vs_float_io_int8": verify.compare(result, io_logits)}
    if "int8" in formats:
        sample = images[:grid_examples]
        checks = [c.to_dict() for c in verify.check_grids(files["int8"], export_plan, sample)]
        if "int4" in formats:
            int4_checks = verify.check_grids(files["int4"], export_plan, sample)
            # XNNPACK takes no INT4 filter with int8 activations: those ops run on the
            # builtin kernels. Under the builtin kernels alone both files must agree bit
            # for bit (the packing changes no value).
            on_builtin = {k: verify.run_tflite(files[k], sample, delegates=False)
                          for k in ("int8", "int4")}
            out["int4_grid_check"] = {
                "all_on_grid": all(c.on_grid for c in int4_checks), "layers": len(int4_checks),
                "builtin_kernels_int4_vs_int8_max_abs_diff": float(
                    np.abs(on_builtin["int4"] - on_builtin["int8"]).max()),
                "builtin_kernels_int8_vs_keras": verify.compare(reference[:len(sample)],
                                                                on_builtin["int8"])}
        with tempfile.TemporaryDirectory() as tmp:
            ints = verify.tflite_quantized_inputs(graphs["int8"], export_plan, sample, tmp)
        vs_keras = verify.match(
            verify.reference_quantized_inputs(model, sample, list(export_plan.inputs)), ints)
        vs_twin = verify.match(
            verify.graph_quantized_inputs(graphs["int8_twin"], export_plan, sample), ints)
        for c in checks:
            c["match_keras"] = vs_keras.get(c["layer"], {}).get("match")
            c["max_int_diff_keras"] = vs_keras.get(c["layer"], {}).get("max_int_diff")
            c["match_int8_twin"] = vs_twin.get(c["layer"], {}).get("match")
        out["grid_check"] = {
            "examples": int(len(sample)),
            "all_on_grid": all(c["on_grid"] for c in checks),
            "median_match_keras": _median([c["match_keras"] for c in checks]),
            "min_match_keras": _min([c["match_keras"] for c in checks]),
            "min_match_int8_twin": _min([c["match_int8_twin"] for c in checks]),
            "layers": checks,
        }
        if tensor_costs:
            log("Measuring what each int8-only tensor costs")
            out["int8_tensor_costs"] = verify.tensor_costs(export_plan, images, reference,
                                                           verify.keras_logits)
    log("Timing " + ", ".join((*formats, *baselines)))
    lat = verify.latency({**{fmt: files[fmt] for fmt in formats}, **baselines},
                         rounds=latency_rounds, runs_per_round=latency_runs,
                         num_threads=latency_threads)
    out["latency"] = lat
    for key in baselines:
        if "int8" in lat:
            lat[f"int8_over_{key}"] = lat["int8"]["median_ms"] / lat[key]["median_ms"]
    if "int8" in lat and "float32" in lat:
        out["latency"]["float32_over_int8"] = (lat["float32"]["median_ms"]
                                               / lat["int8"]["median_ms"])
    if "int8" in lat and "int4" in lat:
        out["latency"]["int4_over_int8"] = lat["int4"]["median_ms"] / lat["int8"]["median_ms"]
    return out


def _float64_reference(model, images, reference, int8_logits, labels, log) -> dict:
    """The Keras model computed in float64 (:func:`precision.float64_copy`) against the
    int8 model and against itself in float32: where the int8 model departs from the float32
    Keras model only by float32 rounding, it agrees with this one."""
    try:
        exact = precision.float64_logits(model, images)
    except Exception as error:  # noqa: BLE001 -- a user layer may fix its dtype: report it
        log(f"No float64 reference: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}
    return {"int8_vs_float64": verify.compare(exact, int8_logits, labels),
            "keras_float32_vs_float64": verify.compare(exact, reference, labels)}


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _min(values):
    values = [v for v in values if v is not None]
    return float(min(values)) if values else None


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, names in os.walk(path) for f in names)
    return os.path.getsize(path)


def _runtime() -> dict:
    """What converted and verified the files: package versions and the CPU (the int8
    kernels' rounding, which the verification relies on, is a property of the runtime)."""
    out = {"machine": platform.machine(), "python": platform.python_version()}
    for package in ("tensorflow", "keras", "ai-edge-litert", "ai-edge-quantizer"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Not JSON serializable: {type(value).__name__}")


def export_run(model_dir: str | None = None, output_dir: str | None = None,
               formats=tflite.FORMATS, verify_models: bool = True,
               max_eval_examples: int | None = 5000, max_calibration_examples: int = 1024,
               run_root: str = DEFAULT_RUN_ROOT, log=print, **kwargs) -> dict:
    """Exports a training run (default: the latest under ``run_root``) to
    ``output_dir`` (default ``<model_dir>/export``); see :func:`export_model`."""
    formats = parse_formats(formats)
    model_dir = model_dir or latest_run(run_root)
    run = load_run(model_dir)
    output_dir = output_dir or os.path.join(model_dir, "export")
    log(f"Run {model_dir}: {run.model.name}, searcher {run.bits_info.get('searcher')}, "
        f"{run.bits_info.get('gbops')} GBOPs")
    calibration, images, labels, class_names, normalisation = _run_data(
        run, max_eval_examples, max_calibration_examples)
    kwargs.setdefault("labels", class_names)
    kwargs.setdefault("normalisation", normalisation)
    kwargs["weight_storage"] = _run_storage(run, kwargs.get("weight_storage"), log)
    report = export_model(
        run.model, output_dir, formats, name=run.config.model.name,
        calibration_data=calibration, eval_images=images, eval_labels=labels,
        verify_models=verify_models, bits_info=run.bits_info,
        max_calibration_examples=max_calibration_examples,
        report_extra={"model_dir": model_dir}, log=log, **kwargs)
    return report


def _run_storage(run, requested: str | None, log) -> str:
    """The weight storage of a run's export: ``requested``, else the one its biases were
    trained on (``finetune.weight_storage``); a line says when their bias grids differ."""
    trained = getattr(run.config.finetune, "weight_storage", "spread")
    if requested is None:
        return trained
    if STORAGE_GRIDS.get(requested) != STORAGE_GRIDS.get(trained):
        log(f"Note: the biases were trained on the '{trained}' storage's int32 grid; "
            f"'{requested}' has another, so the export moves them (agreement may fall below "
            f"100%). Retrain with --set finetune.weight_storage={requested} for an exact file.")
    return requested


def _pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def format_report(report: dict) -> str:
    """A short text table of an export report."""
    lines = [f"Export of {report['model']} -> {report['output_dir']}"]
    v = report.get("verification")
    sizes = {k: f["bytes"] for k, f in report["files"].items()}
    lines.append(f"{'format':<9} {'size KiB':>9} {'top-1 agree':>11} {'max|dlogit|':>11} "
                 f"{'mean|dlogit|':>12} {'accuracy':>9} {'latency ms':>10}")
    for fmt in report["formats"]:
        row = f"{fmt:<9} {sizes[fmt] / 1024:>9.1f}"
        if v:
            t = v["tflite"][fmt]
            lat = v.get("latency", {}).get(fmt, {}).get("median_ms", float("nan"))
            row += (f" {_pct(t['top1_agreement']):>11} {t['max_abs_logit_diff']:>11.4f} "
                    f"{t['mean_abs_logit_diff']:>12.5f} {_pct(t.get('accuracy')):>9} "
                    f"{lat:>10.3f}")
        lines.append(row)
    if v:
        rt = report.get("runtime", {})
        lines.append(f"Reference: the Keras fake-quant model on {v['examples']} images, "
                     f"accuracy {_pct(v.get('reference_accuracy'))}; files run by "
                     f"ai-edge-litert {rt.get('ai-edge-litert')} on {rt.get('machine')}.")
        f64 = v.get("float64_reference")
        if f64 and "error" not in f64:
            exact, own = f64["int8_vs_float64"], f64["keras_float32_vs_float64"]
            lines.append(f"The Keras model in float64: int8 agrees {_pct(exact['top1_agreement'])}"
                         f" (max |dlogit| {exact['max_abs_logit_diff']:.2g}), the Keras model "
                         f"in float32 {_pct(own['top1_agreement'])} (max |dlogit| "
                         f"{own['max_abs_logit_diff']:.2g}).")
        elif f64:
            lines.append(f"No float64 reference: {f64['error']}")
        ratio = v.get("latency", {}).get("float32_over_int8")
        if ratio:
            lines.append(f"float32 / int8 latency: {ratio:.2f}x "
                         f"({v['latency']['int8']['num_threads']} thread(s), XNNPACK)")
        for key in [k[len("int8_over_"):] for k in v.get("latency", {})
                    if k.startswith("int8_over_")]:
            ops = {k: report["graphs"][k]["ops"] for k in ("int8", key)}
            clamps = {k: o.get("MINIMUM", 0) + o.get("MAXIMUM", 0) for k, o in ops.items()}
            lines.append(f"int8 / {key} latency: {v['latency'][f'int8_over_{key}']:.3f}x "
                         f"({v['latency']['int8']['median_ms']:.3f} vs "
                         f"{v['latency'][key]['median_ms']:.3f} ms); ops "
                         f"{sum(ops['int8'].values())} vs {sum(ops[key].values())}, of "
                         f"which MINIMUM / MAXIMUM {clamps['int8']} vs {clamps[key]}")
        ratio = v.get("latency", {}).get("int4_over_int8")
        if ratio:
            g4, c4 = report["graphs"]["int4"], v.get("int4_grid_check", {})
            lines.append(f"int4 / int8 latency: {ratio:.2f}x; INT4 kernels: "
                         f"{g4['int4_layers']}, <= 4-bit kernels kept int8: "
                         f"{g4['int8_kept_layers']}; int4 quantized inputs on their grids: "
                         f"{c4.get('all_on_grid')}; under the builtin kernels (XNNPACK "
                         "takes no INT4 conv) int4 vs int8 max |dlogit| "
                         f"{c4.get('builtin_kernels_int4_vs_int8_max_abs_diff')}")
        plain = v["tflite"].get("int4", {}).get("vs_int8_rounding_keras")
        if plain:
            lines.append("int4 reference: the Keras model rounding the INT4 convs' tensors as "
                         "the builtin kernels do (with the int8 file's rounding instead: "
                         f"{_pct(plain['top1_agreement'])})")
        k = v["keras_graphs"]
        if "int8_twin" in k:
            twin = v["tflite"]["int8"]["vs_int8_keras_twin"]
            lines.append(
                "Top-1 agreement with the Keras model, step by step: BatchNorm folded "
                f"{_pct(k['float']['top1_agreement'])}; + 8-bit grids on the tensors Keras "
                f"keeps in float {_pct(k['int8']['top1_agreement'])}; + int32 biases "
                f"{_pct(k['int8_twin']['top1_agreement'])}; int8 TFLite "
                f"{_pct(v['tflite']['int8']['top1_agreement'])}. int8 TFLite vs that Keras "
                f"twin: {_pct(twin['top1_agreement'])}.")
        g = v.get("grid_check")
        if g:
            lines.append(f"int8 grid check: {len(g['layers'])} quantized inputs, all on their "
                         f"b-bit grids: {g['all_on_grid']}; integers equal to the Keras "
                         f"model's: median {_pct(g['median_match_keras'])}, lowest "
                         f"{_pct(g['min_match_keras'])} (to the int8 twin's: lowest "
                         f"{_pct(g['min_match_int8_twin'])})")
        for key in [k for k in v["tflite"] if k.endswith("io")]:
            io, vs = report["integer_io"][key], v["tflite"][key]["vs_float_io_int8"]
            lines.append(f"{key}: input {io['input']['dtype']} scale {io['input']['scale']:.6g} "
                         f"zero point {io['input']['zero_point']}; top-1 agreement with the "
                         f"float-I/O int8 model {_pct(vs['top1_agreement'])}, max |dlogit| "
                         f"{vs['max_abs_logit_diff']:.3g}")
        costs = v.get("int8_tensor_costs")
        if costs:
            worst = ", ".join(f"{c['tensor']} {_pct(c['top1_agreement'])}" for c in costs[:3])
            lines.append(f"Costliest int8-only tensors (agreement when alone): {worst}")
    t = report["tensors"]
    lines.append(f"int8 tensors: {t['grid']} on learned grids, {t.get('quantized', 0)} on "
                 f"output quantizers' grids, {t['shared']} shared, {t['calibrated']} calibrated "
                 "(float in Keras); inexact quantized inputs: "
                 f"{len(report['inexact_inputs'])}; rounded in Keras as the int8 kernels "
                 f"do: {len(report.get('kernel_rounding', []))}")
    return "\n".join(lines)
