"""The CIFAR-10 study of issue 12: accuracy-vs-GBOPs curves of uniform LSQ, the joint
(EdMIPS/DNAS) searcher and MetaMix on the float ResNet-20, with paired-bootstrap CIs.

The full study (resumable: rerun the same command after a kill; see EPOCHS below for the
time it takes):

    unzip -q ../shared/data/cifar10-jpeg.zip -d /tmp/cifar10
    PYTHONPATH=. python benchmarks/cifar10_curves.py --data=folder:/tmp/cifar10 \\
        --weights=weights/cifar10_resnet20_swa3.weights.h5 --results_dir=docs/results/cifar10_curves
    PYTHONPATH=. python benchmarks/cifar10_curves.py --results_dir=docs/results/cifar10_curves \\
        --report

Every method starts from the same float weights (``--weights``), runs its search phase
(``metamix_tf.api.run_search``; uniform LSQ trains weights and step sizes at its bit-width
for the same steps), then the same weight training (``api.run_finetune``, 4-bit weights).
Methods, for every seed of ``--seeds``: uniform A2/A3/A4/A8; joint and MetaMix at the GBOPs
of uniform A4W4, A3W4 and A2.5W4; at the A3 target MetaMix's fixed-meta-state ablation
(weights also stepped in the bit-search step, ``MetaMix(update_weights_in_search=True)``)
and the joint searcher given MetaMix's search wall time (its epochs scaled by the measured
ratio of the two searches' times; it needs both A3 runs of that seed finished), and MetaMix
with the split-batch bit-meta pass (``MetaMix(meta_batch="split")``, issue 14's cheaper
search: one forward/backward with the batch cut into one part per candidate instead of K).

After the search, for every method alike, BatchNorm statistics are re-estimated
(``metamix_tf.analysis.evaluation.reestimate_batch_norm``, ``--bn_batches`` training batches) at the
argmax selection and at the ``enforce_target``-lowered one, and both are evaluated on the
whole test set (GBOPs and accuracy of each; the accuracy without re-estimation is kept
too); weight training starts from the lowered bits with their re-estimated statistics.
Activation stability is measured on the searched model: the all-layers metric
(``stability.activation_shift``) and the one-layer-at-a-time metric
(``stability_layerwise.layer_swap_shift``) at the selected bits.

Each method's result is written to ``<results_dir>/<method>.json`` as soon as it finishes
(per-image correctness bit-packed, so the report can bootstrap over images); a rerun skips
the methods whose file exists. The method in progress checkpoints every search and
weight-training epoch into ``--state_dir`` (``runs/cifar10_curves_state/<method>``, not
committed): a rerun resumes it from its last finished epoch (a state made with other flags
is refused), and the directory goes when the method's file is written. ``--report`` reads
the files, writes ``report.md``, ``report.json`` and ``accuracy_vs_gbops.png`` into
``results_dir`` and prints the table.

EPOCHS AND TIME. Defaults: full passes over the 50,000 training images (390 batches of
128), 2 search epochs for every searcher (MetaMix: 1 bit-meta warm-up + 1 bit-search
epoch; alpha lr from the displacement rule, so lr x alpha steps = 0.5 for both), 2
weight-training epochs, seeds 0 and 1: 26 methods. Extrapolated from a timing run (process
CPU seconds per step, measured under load, 2 shared cores):

    for m in uniform_a4 joint_a3 metamix_a3; do PYTHONPATH=. python \\
        benchmarks/cifar10_curves.py --results_dir=/tmp/curves_cpu --seeds=0 \\
        --steps_per_epoch=3 --search_epochs=3 --finetune_epochs=2 \\
        --max_train_examples=2048 --max_eval_examples=500 --bn_batches=2 \\
        --stability_images=32 --swap_bits=2 --methods=$m; done
    PYTHONPATH=. python benchmarks/cifar10_curves.py --estimate=/tmp/curves_cpu

CPU seconds per step: uniform 0.93, joint 1.35, MetaMix (bit-meta + bit-search) 5.31,
weight training 1.04; per method fixed (tracing, BN re-estimation, four test-set
inferences, about 65 stability passes) about 0.1 CPU-h. Per method: uniform 0.5 CPU-h,
joint 0.6, MetaMix 1.5, the ablation 1.8, joint at MetaMix's wall time 1.5. Total 23.3
CPU-hours for the 24 methods before the split-batch MetaMix was added (--estimate counts its
step as MetaMix's full one, an upper bound: +3 CPU-h); with the float ResNet-20's CPU
seconds per image against its quiet 520 images/s (0.42 quiet wall seconds per CPU second,
also measured under load) about 9.8 hours of quiet wall time. Both are estimates from a
loaded machine (CPU time is inflated by contention too); ``--steps_per_epoch=200
--finetune_epochs=3``: 14.5 CPU-h, about 6 h.

About 700 lines, one script for the study's three modes (run, --report, --estimate); what
is reusable lives in the package (metamix_tf.analysis.evaluation, .paired_bootstrap,
.stability_layerwise, MetaMix's ablation option).

Smoke check (tiny settings, numbers mean nothing; run for uniform_a4, metamix_a3, joint_a3,
metamix_wsearch_a3 and joint_walltime_a3, then --report):

    PYTHONPATH=. python benchmarks/cifar10_curves.py --data=folder:/tmp/cifar10 \\
        --weights=weights/cifar10_resnet20_swa3.weights.h5 --results_dir=/tmp/curves_smoke \\
        --seeds=0 --steps_per_epoch=2 --search_epochs=2 --finetune_epochs=1 \\
        --max_train_examples=2048 --max_eval_examples=500 --bn_batches=2 \\
        --stability_images=32 --swap_bits=2
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from metamix_tf import api, models  # noqa: E402
from metamix_tf import config as config_lib  # noqa: E402
from metamix_tf import data as data_lib  # noqa: E402
from metamix_tf.analysis import evaluation, stability, stability_layerwise  # noqa: E402
from metamix_tf.analysis.paired_bootstrap import paired_bootstrap  # noqa: E402
from metamix_tf.quant import wrap  # noqa: E402
from metamix_tf.quant.cost import CostModel  # noqa: E402
from metamix_tf.training import searchers, trainer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", "folder:/tmp/cifar10", "folder:PATH of the CIFAR-10 JPEGs.")
flags.DEFINE_string("weights", "weights/cifar10_resnet20_swa3.weights.h5",
                    "The float ResNet-20 every method starts from.")
flags.DEFINE_string("results_dir", "docs/results/cifar10_curves",
                    "One JSON per finished method; the report's files.")
flags.DEFINE_string("state_dir", "runs/cifar10_curves_state",
                    "Per-method checkpoints (each search and weight-training epoch): a killed "
                    "method resumes from its last finished epoch; removed when it finishes.")
flags.DEFINE_bool("report", False, "Only build the table, CIs and plot from results_dir.")
flags.DEFINE_string("estimate", None, "A results_dir of a timing run (uniform_a4, joint_a3, "
                    "metamix_a3 with >= 3 search epochs of a few steps, full test set): "
                    "print the study's CPU time extrapolated to the current flags.")
flags.DEFINE_string("unit_costs", None, "A JSON of unit_costs() to reuse with --estimate "
                    "(default: measure them now).")
flags.DEFINE_float("quiet_float_images_per_s", 520.0, "Float ResNet-20 training throughput "
                   "of the quiet machine (issue 12): --estimate converts CPU time to quiet "
                   "wall time with it.")
flags.DEFINE_list("seeds", ["0", "1"], "Search seeds (each also seeds the data order).")
flags.DEFINE_list("methods", None, "Only the methods whose name starts with one of these "
                  "(e.g. uniform_a4,metamix_a3); default: all.")
flags.DEFINE_integer("steps_per_epoch", 0, "Batches of 128 per epoch (0: a full pass, 390).")
flags.DEFINE_integer("search_epochs", 2, "Search epochs of every searcher (uniform LSQ: "
                     "training epochs at its bit-width).")
flags.DEFINE_integer("warmup_epochs", 1, "MetaMix's bit-meta-only epochs (within "
                     "search_epochs).")
flags.DEFINE_integer("finetune_epochs", 2, "Weight-training epochs after every search.")
flags.DEFINE_integer("bn_batches", 50, "Training batches for the BatchNorm re-estimation.")
flags.DEFINE_integer("stability_images", 256, "Test images for the stability metrics.")
flags.DEFINE_list("swap_bits", None, "Bit-widths of the one-layer stability swaps (default: "
                  "every other candidate; fewer: fewer forward passes).")
flags.DEFINE_integer("bootstrap_resamples", 2000, "Resamples of the paired bootstrap.")
flags.DEFINE_float("cost_weight", 4.0, "lambda of both searchers.")
flags.DEFINE_enum("cost_normalization", "relative", ["relative", "absolute"],
                  "search.cost_normalization of both searchers.")
flags.DEFINE_float("alpha_displacement", 0.5, "lr x alpha steps of both searchers "
                   "(search.alpha_lr_rule=displacement).")
flags.DEFINE_float("alpha_l2", 1e-3, "Coupled L2 on the alphas (the paper's Adam weight "
                   "decay); the decoupled decay is off.")
flags.DEFINE_float("alpha_init_bias", 0.01, "Initial logit bias toward the uniform bits "
                   "nearest the target.")
flags.DEFINE_integer("max_train_examples", None, "A stratified train subset (smoke only).")
flags.DEFINE_integer("max_eval_examples", None, "A stratified test subset (smoke only; the "
                     "study uses all 10,000 test images).")

CANDIDATE_BITS = (2, 3, 4, 8)
UNIFORM_BITS = (2, 3, 4, 8)
TARGETS = {"a4": 4.0, "a3": 3.0, "a2.5": 2.5}  # GBOPs of uniform A<b>W4
ABLATION_TARGET = "a3"
FAMILIES = ("uniform", "joint", "metamix", "metamix_wsearch", "joint_walltime",
            "metamix_split")


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def method_list(seeds) -> list[dict]:
    """Every method of the study, in run order (a seed's cheap ones first)."""
    out = []
    for seed in seeds:
        out += [dict(name=f"uniform_a{b}_s{seed}", family="uniform", bits=b, target=None,
                     seed=seed) for b in UNIFORM_BITS]
        for t in TARGETS:
            out += [dict(name=f"{f}_{t}_s{seed}", family=f, bits=None, target=t, seed=seed)
                    for f in ("metamix", "joint")]
        t = ABLATION_TARGET
        out += [dict(name=f"metamix_wsearch_{t}_s{seed}", family="metamix_wsearch",
                     bits=None, target=t, seed=seed),
                dict(name=f"joint_walltime_{t}_s{seed}", family="joint_walltime",
                     bits=None, target=t, seed=seed),
                dict(name=f"metamix_split_{t}_s{seed}", family="metamix_split",
                     bits=None, target=t, seed=seed)]
    return out


def search_options(bits: int | None) -> config_lib.SearchConfig:
    return config_lib.SearchConfig(
        searcher="metamix", learning_rate=5e-4, weight_decay=1e-5,
        alpha_lr_rule="displacement", alpha_displacement=FLAGS.alpha_displacement,
        alpha_l2=FLAGS.alpha_l2, alpha_weight_decay=0.0, alpha_init_bias=FLAGS.alpha_init_bias,
        cost_weight=FLAGS.cost_weight, cost_normalization=FLAGS.cost_normalization,
        enforce_target=True, uniform_bits=bits or 4)


def finetune_options() -> config_lib.FinetuneConfig:
    return config_lib.FinetuneConfig(learning_rate=5e-4, weight_decay=5e-6, snap_biases=False)


def _searcher(m: dict, epochs: int) -> searchers.Searcher:
    if m["family"] == "uniform":
        return searchers.Uniform(m["bits"])
    if m["family"] in ("joint", "joint_walltime"):
        return searchers.Joint()
    return searchers.MetaMix(min(FLAGS.warmup_epochs, epochs - 1),
                             meta_batch="split" if m["family"] == "metamix_split" else "full",
                             update_weights_in_search=m["family"] == "metamix_wsearch")


# The flags a method's checkpoints depend on: a state left with other values is refused.
STATE_FLAGS = ("data", "weights", "steps_per_epoch", "search_epochs", "warmup_epochs",
               "finetune_epochs", "cost_weight", "cost_normalization", "alpha_displacement",
               "alpha_l2", "alpha_init_bias", "max_train_examples")


def method_state(m: dict, epochs: int) -> str:
    """The checkpoint directory of method ``m`` (``<state_dir>/<name>``), with the settings
    it was started with in ``settings.json``; a rerun with other settings is refused in one
    line, since resuming would mix two runs."""
    path = os.path.join(FLAGS.state_dir, m["name"])
    settings = json.loads(json.dumps({"method": m, "search_epochs_run": epochs,
                                      **{k: FLAGS[k].value for k in STATE_FLAGS}}))
    recorded = os.path.join(path, "settings.json")
    if os.path.exists(recorded):
        old = _read(recorded)
        changed = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
        if changed:
            raise SystemExit(
                f"{path} holds checkpoints of {m['name']} made with other settings "
                f"({', '.join(changed)}): remove it to start the method again, or pass the "
                f"same flags. Received: " + ", ".join(f"{k}={settings.get(k)!r}" for k in changed))
    else:
        os.makedirs(path, exist_ok=True)
        _write(recorded, settings)
    return path


def _result_path(name: str) -> str:
    return os.path.join(FLAGS.results_dir, f"{name}.json")


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _walltime_epochs(seed) -> int | None:
    """Joint epochs that take MetaMix's search wall time at the ablation target, from the
    finished runs of this seed (None when one is missing)."""
    t = ABLATION_TARGET
    paths = [_result_path(f"{f}_{t}_s{seed}") for f in ("metamix", "joint")]
    if not all(os.path.exists(p) for p in paths):
        return None
    metamix, joint = (_read(p) for p in paths)
    times = [h["time_s"] for h in joint["history"]["search"]]
    per_epoch = float(np.median(times[1:] if len(times) > 1 else times))  # 1st: tracing
    return max(1, round(metamix["wall_time_s"]["search"] / per_epoch))


# ---------------------------------------------------------------------------------------------
# One method
# ---------------------------------------------------------------------------------------------


def pack(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode("ascii")


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


class Study:
    """Data per seed and the cost model, shared by the methods of one process."""

    def __init__(self):
        self.strategy = tf.distribute.get_strategy()
        self._data, self._bn = {}, {}
        self.preprocess = models.preprocess_input("resnet20")

    def data(self, seed: int) -> data_lib.Datasets:
        if seed not in self._data:
            cfg = config_lib.DataConfig(
                dataset=FLAGS.data, batch_size=128, eval_batch_size=500, augment=True,
                seed=seed, max_train_examples=FLAGS.max_train_examples,
                max_eval_examples=FLAGS.max_eval_examples)
            self._data[seed] = data_lib.load(cfg, preprocess=self.preprocess)
        return self._data[seed]

    def bn_batches(self, seed: int) -> list:
        """The BatchNorm re-estimation batches of a seed, drawn once: every method and
        both selections of a method see the same images."""
        if seed not in self._bn:
            self._bn[seed] = list(self.data(seed).train.take(FLAGS.bn_batches))
        return self._bn[seed]

    def model(self, data: data_lib.Datasets):
        float_model = models.build("resnet20", data.image_shape, data.num_classes,
                                   weights=FLAGS.weights)
        return wrap.apply(float_model, config_lib.QuantConfig(candidate_bits=CANDIDATE_BITS))

    def steps_per_epoch(self, data) -> int:
        full = data.train_size // 128
        return min(FLAGS.steps_per_epoch, full) if FLAGS.steps_per_epoch else full


class CpuClock(keras.callbacks.Callback):
    """The process CPU seconds of every epoch (independent of the machine's load, unlike
    the wall time), for --estimate, and the 1-minute load average at each epoch's end (the
    study's own threads make about 2 on 2 cores; more means other jobs shared the cores,
    which the wall-time comparison of the searchers must know)."""

    def __init__(self):
        super().__init__()
        self.epochs, self.load, self._start = [], [], None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.process_time() - self._start)
        self.load.append(round(os.getloadavg()[0], 2))


def _batch_norm_state(model) -> list:
    return [(keras.ops.convert_to_numpy(bn.moving_mean),
             keras.ops.convert_to_numpy(bn.moving_variance))
            for bn in evaluation.batch_norm_layers(model)]


def _set_batch_norm_state(model, state) -> None:
    for bn, (mean, var) in zip(evaluation.batch_norm_layers(model), state, strict=True):
        bn.moving_mean.assign(mean)
        bn.moving_variance.assign(var)


def _evaluate(model, data, bits) -> tuple[float, np.ndarray, np.ndarray]:
    predicted, labels = evaluation.predictions(model, data.eval, bits=bits)
    correct = predicted == labels
    return float(correct.mean()), correct, labels


def run_method(study: Study, m: dict) -> dict:
    seed = int(m["seed"])
    data = study.data(seed)
    keras.utils.set_random_seed(seed)
    epochs = FLAGS.search_epochs
    if m["family"] == "joint_walltime":
        epochs = _walltime_epochs(seed)
    model = study.model(data)
    cost = CostModel(model)
    target = None if m["target"] is None else cost.uniform_gbops(TARGETS[m["target"]])
    steps = study.steps_per_epoch(data)
    iterators = trainer.EpochIterators(study.strategy, data.train)
    checkpoints = method_state(m, epochs)
    loop = trainer.Loop(strategy=study.strategy, iterators=iterators, steps_per_epoch=steps,
                        checkpoint_dir=os.path.join(checkpoints, "search"))
    searcher = _searcher(m, epochs)
    began, cpu_began = time.time(), time.process_time()
    search_clock, finetune_clock = CpuClock(), CpuClock()
    result = api.run_search(model, loop, searcher, epochs=epochs,
                            options=search_options(m["bits"]), target_gbops=target,
                            callbacks=[search_clock])
    cpu = {"search": time.process_time() - cpu_began}
    selected = dict(result.bits)
    searched = not isinstance(searcher, searchers.Uniform)
    argmax = {**selected, **{layer.name: layer.input_quantizer.argmax_bits
                             for layer in wrap.quant_layers(model)
                             if layer.input_quantizer is not None
                             and layer.input_quantizer.searchable}} if searched else selected

    # after search: as the search left BN, then BN re-estimated at argmax and at the lowered
    t0, c0 = time.time(), time.process_time()
    acc_raw, _, labels = _evaluate(model, data, selected)
    state = _batch_norm_state(model)
    after = {}
    for kind, bits in (("argmax", argmax), ("lowered", selected)):
        _set_batch_norm_state(model, state)
        evaluation.reestimate_batch_norm(model, study.bn_batches(seed), bits=bits,
                                         num_batches=FLAGS.bn_batches)
        acc, correct, _ = _evaluate(model, data, bits)
        after[kind] = dict(gbops=cost.gbops(bits), acc=acc, correct=pack(correct),
                           avg_bits=cost.report(bits)["avg_activation_bits"], bits=bits)
    evaluate_s, cpu["evaluate"] = time.time() - t0, time.process_time() - c0

    # stability of the searched model at the selected bits (weights not quantized yet)
    t0, c0 = time.time(), time.process_time()
    images = np.concatenate([x.numpy() for x, _ in data.eval.take(
        -(-FLAGS.stability_images // 500))])[:FLAGS.stability_images]
    whole = stability.activation_shift(model, images, reference=max(CANDIDATE_BITS))
    one = stability_layerwise.layer_swap_shift(
        model, images, bits=selected,
        swap_bits=[int(b) for b in FLAGS.swap_bits] if FLAGS.swap_bits else None)
    wrap.select_bits(model, selected)
    stability_s, cpu["stability"] = time.time() - t0, time.process_time() - c0
    c0 = time.process_time()

    ft_loop = trainer.Loop(strategy=study.strategy, iterators=iterators,
                            steps_per_epoch=steps, slot_offset=epochs + 1,
                            checkpoint_dir=os.path.join(checkpoints, "finetune"))
    finetuned = api.run_finetune(model, ft_loop, epochs=FLAGS.finetune_epochs,
                                 options=finetune_options(), bits=selected,
                                 callbacks=[finetune_clock])
    final_acc, final_correct, _ = _evaluate(model, data, selected)
    cpu["finetune_and_final_eval"] = time.process_time() - c0
    cpu["total"] = time.process_time() - cpu_began
    return {
        "method": m["name"], "family": m["family"], "seed": seed, "target": m["target"],
        "uniform_bits": m["bits"], "target_gbops": target if target is not None
        else cost.uniform_gbops(float(m["bits"])),
        "searcher": searcher.describe(), "search_epochs": epochs,
        "finetune_epochs": FLAGS.finetune_epochs, "steps_per_epoch": steps,
        "settings": result.settings, "lowered_to_target": result.lowered_to_target,
        "search_acc_no_bn_reestimation": acc_raw,
        "after_search": after, "gbops": after["lowered"]["gbops"],
        "final_acc": final_acc, "final_correct": pack(final_correct),
        "eval_images": int(len(labels)),
        "labels_sha1": hashlib.sha1(labels.astype(np.int32).tobytes()).hexdigest(),
        "stability": {"all_layers": {str(b): v for b, v in whole["mean"].items()},
                      "one_layer": {"mean": one["mean"],
                                    "mean_by_bits": {str(b): v for b, v in
                                                     one["mean_by_bits"].items()},
                                    "per_swap": one["per_swap"]}},
        "history": {"search": _plain(result.history), "finetune": _plain(finetuned.history)},
        "wall_time_s": {"search": result.wall_time_s, "finetune": finetuned.wall_time_s,
                        "evaluate": evaluate_s, "stability": stability_s,
                        "total": time.time() - began},
        "cpu_s": {**cpu, "search_epochs": search_clock.epochs,
                  "finetune_epochs": finetune_clock.epochs},
        "load_average_1min": {"search_epochs": search_clock.load,
                              "finetune_epochs": finetune_clock.load},
        # epochs restored from an earlier process's checkpoints (their CPU time is not in
        # cpu_s; their wall time is in wall_time_s)
        "resumed_epochs": {"search": len(result.history) - len(search_clock.epochs),
                           "finetune": len(finetuned.history) - len(finetune_clock.epochs)},
        "stability_images": int(len(images)),
        "stability_swaps": len(one["per_swap"]), "bn_batches": FLAGS.bn_batches,
        "weights": FLAGS.weights, "train_images": data.train_size,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "tensorflow": tf.__version__},
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _plain(history: list) -> list:
    """History records without the per-layer bits (kept in after_search)."""
    return [{k: v for k, v in h.items() if k != "bits"} for h in history]


def _write(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=lambda v: np.asarray(v).tolist())
    os.replace(tmp, path)  # a killed write leaves no half file that would be skipped


def run_study() -> None:
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    study = Study()
    todo = [m for m in method_list([int(s) for s in FLAGS.seeds])
            if not FLAGS.methods or any(m["name"].startswith(p) for p in FLAGS.methods)]
    for i, m in enumerate(todo):
        path = _result_path(m["name"])
        if os.path.exists(path):
            print(f"[{i + 1}/{len(todo)}] {m['name']}: done, skipped", flush=True)
            continue
        if m["family"] == "joint_walltime" and _walltime_epochs(m["seed"]) is None:
            print(f"[{i + 1}/{len(todo)}] {m['name']}: needs metamix_{ABLATION_TARGET} and "
                  f"joint_{ABLATION_TARGET} of seed {m['seed']} first, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(todo)}] {m['name']} ...", flush=True)
        record = run_method(study, m)
        _write(path, record)
        shutil.rmtree(os.path.join(FLAGS.state_dir, m["name"]), ignore_errors=True)
        print(f"[{i + 1}/{len(todo)}] {m['name']}: {record['gbops']:.4f} GBOPs, after search "
              f"{100 * record['after_search']['lowered']['acc']:.2f}%, final "
              f"{100 * record['final_acc']:.2f}%, {record['wall_time_s']['total']:.0f} s "
              f"-> {path}", flush=True)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def load_results(directory: str) -> list[dict]:
    results = [_read(p) for p in sorted(glob.glob(os.path.join(directory, "*.json")))
               if not os.path.basename(p).startswith("report")]
    hashes = {r["labels_sha1"] for r in results}
    if len(hashes) > 1:
        raise ValueError(f"The results in {directory} were evaluated on different test sets "
                         f"(label hashes {sorted(hashes)}); keep one study per directory.")
    return results


def _groups(results: list[dict]) -> dict:
    """(family, target or uniform bits) -> the runs of every seed, sorted by seed."""
    out = {}
    for r in results:
        key = (r["family"], r["target"] if r["target"] is not None else f"a{r['uniform_bits']}")
        out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def _correct(runs: list[dict], which: str = "final") -> np.ndarray:
    return np.stack([unpack(r["final_correct"] if which == "final"
                            else r["after_search"]["lowered"]["correct"], r["eval_images"])
                     for r in runs])


def comparisons(groups: dict) -> list[dict]:
    """MetaMix vs joint, vs uniform (the cheapest uniform costing at least MetaMix's
    GBOPs), vs its ablation and vs joint at equal wall time, with paired-bootstrap CIs."""
    uniform = sorted(((np.mean([r["gbops"] for r in runs]), key) for key, runs in
                      groups.items() if key[0] == "uniform"))
    out = []
    for key, runs in sorted(groups.items()):
        if key[0] != "metamix":
            continue
        gbops = float(np.mean([r["gbops"] for r in runs]))
        others = [("joint", key[1]), ("metamix_wsearch", key[1]), ("joint_walltime", key[1]),
                  ("metamix_split", key[1])]
        above = [k for g, k in uniform if g >= gbops * (1 - 1e-9)]
        if above:
            others.append(above[0])
        for other in others:
            if other not in groups:
                continue
            b = groups[other]
            stats = paired_bootstrap(_correct(runs), _correct(b),
                                     num_resamples=FLAGS.bootstrap_resamples)
            out.append({"a": f"metamix {key[1]}", "b": f"{other[0]} {other[1]}",
                        "gbops_a": gbops, "gbops_b": float(np.mean([r["gbops"] for r in b])),
                        **stats})
    return out


def _mean(values) -> float:
    return float(np.mean(values))


def _bit_search_epoch(record: dict) -> bool:
    """Whether a search-history epoch ran the bit search (MetaMix's warm-up epochs did not)."""
    return "search_gbops" in record or "gbops" in record


def _epoch_cpu(runs: list[dict], searched: bool) -> float | None:
    """Mean process CPU seconds of the search epochs that ran the bit search (``searched``)
    or bit-meta alone, over the epochs each run measured (not those it resumed past)."""
    values = []
    for r in runs:
        history, cpu = r["history"]["search"], r["cpu_s"]["search_epochs"]
        for record, seconds in zip(history[len(history) - len(cpu):], cpu, strict=True):
            if _bit_search_epoch(record) == searched:
                values.append(seconds)
    return _mean(values) if values else None


def table_rows(groups: dict) -> list[dict]:
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows = []
    for key, runs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9),
                                                             -kv[1][0]["target_gbops"])):
        finals = [r["final_acc"] for r in runs]
        rows.append({
            "method": key[0], "target": key[1], "seeds": [r["seed"] for r in runs],
            "target_gbops": runs[0]["target_gbops"],
            "gbops": _mean([r["gbops"] for r in runs]),
            "argmax_gbops": _mean([r["after_search"]["argmax"]["gbops"] for r in runs]),
            "acc_search_no_bn": _mean([r["search_acc_no_bn_reestimation"] for r in runs]),
            "acc_search_argmax": _mean([r["after_search"]["argmax"]["acc"] for r in runs]),
            "acc_search": _mean([r["after_search"]["lowered"]["acc"] for r in runs]),
            "final_acc": _mean(finals), "final_acc_min": min(finals),
            "final_acc_max": max(finals),
            "search_s": _mean([r["wall_time_s"]["search"] for r in runs]),
            "search_epochs": _mean([r["search_epochs"] for r in runs]),
            "meta_only_epoch_cpu_s": None if key[0] == "uniform" else _epoch_cpu(runs, False),
            "bit_search_epoch_cpu_s": None if key[0] == "uniform" else _epoch_cpu(runs, True),
            "stability_one_layer_bn_mean": _mean(
                [r["stability"]["one_layer"]["mean"].get("bn_mean_shift", np.nan)
                 for r in runs]),
            "stability_all_layers_2bit_bn_mean": _mean(
                [r["stability"]["all_layers"]["2"]["bn_mean_shift"] for r in runs]),
        })
    return rows


def markdown(rows: list[dict], comps: list[dict], n_images: int) -> str:
    lines = [f"Accuracy on {n_images} test images (mean over seeds; final = after weight "
             "training; after-search accuracies with BatchNorm re-estimated at the bits).", "",
             "| method | target | seeds | GBOPs (lowered / argmax) | after search, no BN re-est."
             " | after search argmax | after search lowered | final (min..max) | search s "
             "(epochs) | BN shift one layer | BN shift all at 2 bits |",
             "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['target']} | {len(r['seeds'])} | {r['gbops']:.4f} / "
            f"{r['argmax_gbops']:.4f} | {100 * r['acc_search_no_bn']:.2f} | "
            f"{100 * r['acc_search_argmax']:.2f} | {100 * r['acc_search']:.2f} | "
            f"{100 * r['final_acc']:.2f} ({100 * r['final_acc_min']:.2f}.."
            f"{100 * r['final_acc_max']:.2f}) | {r['search_s']:.0f} ({r['search_epochs']:g}) | "
            f"{r['stability_one_layer_bn_mean']:.4f} | "
            f"{r['stability_all_layers_2bit_bn_mean']:.4f} |")
    lines += ["", "Search cost: process CPU seconds per search epoch (mean over the epochs "
              "each run measured; the 1-minute load average during each epoch is in its "
              "JSON), and the search's wall time, each against the joint searcher's at the "
              "same target:", "",
              "| method | target | bit-meta-only epoch, CPU s | bit-search epoch, CPU s | "
              "bit-search epoch / joint's | search wall time / joint's |",
              "|---|---|---|---|---|---|"]
    joint = {r["target"]: r for r in rows if r["method"] == "joint"}
    for r in rows:
        if r["bit_search_epoch_cpu_s"] is None or r["target"] not in joint:
            continue
        base = joint[r["target"]]
        meta = r["meta_only_epoch_cpu_s"]
        lines.append(f"| {r['method']} | {r['target']} | "
                     f"{'-' if meta is None else f'{meta:.0f}'} | "
                     f"{r['bit_search_epoch_cpu_s']:.0f} | "
                     f"{r['bit_search_epoch_cpu_s'] / base['bit_search_epoch_cpu_s']:.2f}x | "
                     f"{r['search_s'] / base['search_s']:.2f}x |")
    lines += ["", "Paired bootstrap (over test images and seeds), final accuracy, "
              "difference a - b in points with its 95% CI:", "",
              "| a | b | GBOPs a | GBOPs b | a at <= GBOPs of b | a - b | 95% CI | "
              "CI excludes 0 |", "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        excludes = c["low"] > 0 or c["high"] < 0
        cheaper = c["gbops_a"] <= c["gbops_b"] * (1 + 1e-9)
        lines.append(f"| {c['a']} | {c['b']} | {c['gbops_a']:.4f} | {c['gbops_b']:.4f} | "
                     f"{'yes' if cheaper else 'no'} | {100 * c['diff']:+.2f} | "
                     f"[{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
                     f" | {'yes' if excludes else 'no'} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"uniform": ("uniform LSQ", "tab:gray", "s"),
              "joint": ("joint (EdMIPS/DNAS)", "tab:orange", "^"),
              "metamix": ("MetaMix", "tab:blue", "o"),
              "metamix_wsearch": ("MetaMix, weights in bit-search (ablation)", "tab:purple",
                                  "D"),
              "joint_walltime": ("joint, MetaMix's wall time", "tab:red", "v"),
              "metamix_split": ("MetaMix, split-batch bit-meta", "tab:cyan", "P")}
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4))
    groups = _groups(results)
    for family, (label, color, marker) in styles.items():
        runs = [r for r in results if r["family"] == family]
        if not runs:
            continue
        for ax, x in ((axes[0], "gbops"), (axes[1], "search_s")):
            xs = [r["gbops"] if x == "gbops" else r["wall_time_s"]["search"] for r in runs]
            ax.scatter(xs, [100 * r["final_acc"] for r in runs], color=color, marker=marker,
                       alpha=0.35, s=18)
        means = sorted((_mean([r["gbops"] for r in g]), 100 * _mean([r["final_acc"] for r in g]))
                       for k, g in groups.items() if k[0] == family)
        axes[0].plot(*zip(*means, strict=True), color=color, marker=marker, label=label)
        axes[1].scatter([], [], color=color, marker=marker, label=label)
    float_json = results[0]["weights"].replace(".weights.h5", ".json")
    if os.path.exists(float_json):
        for ax in axes:
            ax.axhline(100 * _read(float_json)["val_acc"], color="k", ls="--", lw=1,
                       label="float")
    axes[0].set_xlabel("GBOPs (4-bit weights; first/last layer 8-bit)")
    axes[1].set_xlabel("search wall time (s, measured under load)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("top-1 after weight training (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("CIFAR-10 ResNet-20: points = seeds, lines = means", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report() -> None:
    results = load_results(FLAGS.results_dir)
    if not results:
        raise ValueError(f"No results in {FLAGS.results_dir}; run the study first.")
    groups = _groups(results)
    rows, comps = table_rows(groups), comparisons(groups)
    text = markdown(rows, comps, results[0]["eval_images"])
    with open(os.path.join(FLAGS.results_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    _write(os.path.join(FLAGS.results_dir, "report.json"),
           {"rows": rows, "comparisons": comps,
            "total_wall_time_s": sum(r["wall_time_s"]["total"] for r in results)})
    plot(results, os.path.join(FLAGS.results_dir, "accuracy_vs_gbops.png"))
    print(text)


# ---------------------------------------------------------------------------------------------
# CPU-time estimate
# ---------------------------------------------------------------------------------------------


def _cpu(fn) -> float:
    began = time.process_time()
    fn()
    return time.process_time() - began


def unit_costs() -> dict:
    """Process CPU seconds, measured now on random data (load-independent up to cache
    effects): one 500-image inference batch, one 128-image training-mode forward (the BN
    re-estimation), one stability pass on --stability_images images, and one float
    ResNet-20 training image (against --quiet_float_images_per_s: the ratio of quiet wall
    time to CPU time)."""
    from metamix_tf.training import steps as steps_lib

    strategy = tf.distribute.get_strategy()
    model = models.build("resnet20", (32, 32, 3), 10)
    step = steps_lib.make_train_step(strategy, model, keras.optimizers.SGD(0.01),
                                model.trainable_variables)
    x, y = tf.random.normal((128, 32, 32, 3)), tf.zeros((128,), tf.int32)
    for _ in range(2):
        step(x, y)
    float_per_image = _cpu(lambda: [step(x, y)["loss_sum"].numpy() for _ in range(8)]) / 1024
    qmodel = wrap.apply(model, config_lib.QuantConfig(candidate_bits=CANDIDATE_BITS))
    images = tf.random.normal((500, 32, 32, 3))
    wrap.calibrate(qmodel, images[:128])
    bits = wrap.select_bits(qmodel, {
        layer.name: 4 for layer in wrap.quant_layers(qmodel)
        if layer.input_quantizer is not None and layer.input_quantizer.searchable})

    def batches(n, size):
        return tf.data.Dataset.from_tensors((images[:size], tf.zeros((size,), tf.int32))
                                            ).repeat(n)

    def infer(n):
        return _cpu(lambda: evaluation.predictions(qmodel, batches(n, 500), bits=bits))

    def bn(n):
        return _cpu(lambda: evaluation.reestimate_batch_norm(qmodel, batches(n, 128),
                                                             bits=bits, num_batches=n))

    stab = np.asarray(tf.random.normal((FLAGS.stability_images, 32, 32, 3)))
    stability.activation_statistics(qmodel, stab[:8], 4)  # first-call costs
    return {"inference_batch500": (infer(4) - infer(1)) / 3,
            "bn_batch128": (bn(6) - bn(1)) / 5,
            "stability_pass": _cpu(lambda: stability.activation_statistics(qmodel, stab, 4)),
            "float_train_image": float_per_image,
            "searchable_layers": len(wrap.activation_quantizers(qmodel, searchable_only=True))}


def estimate(directory: str) -> dict:
    """The study's CPU time at the current flags, from a timing run's JSONs (uniform_a4,
    joint_a3 and metamix_a3 with >= 3 search epochs of a few steps, any eval size) and
    :func:`unit_costs`.

    A method's CPU = its steps (per-step CPU of each phase from its last epoch; MetaMix's
    warm-up epochs at its full step, an upper bound; the ablation's step as MetaMix's plus
    the joint step, an upper bound; the joint searcher given MetaMix's wall time as
    MetaMix's search) + its fixed cost measured in the timing run (tracing, calibration:
    the run's CPU minus its steps, evaluations and stability passes) + 4 test-set
    inferences, 2 x --bn_batches BN batches and the stability passes at unit cost."""
    runs = {r["family"]: r for r in load_results(directory)}
    missing = {"uniform", "joint", "metamix"} - set(runs)
    if missing:
        raise ValueError(f"The timing run in {directory} lacks {sorted(missing)}.")
    unit = _read(FLAGS.unit_costs) if FLAGS.unit_costs else unit_costs()
    step_cpu, fixed = {}, {}
    for family, r in runs.items():
        c, n = r["cpu_s"], r["steps_per_epoch"]
        step_cpu[family] = c["search_epochs"][-1] / n
        step_cpu[f"finetune_{family}"] = c["finetune_epochs"][-1] / n
        steps_cpu = n * (r["search_epochs"] * step_cpu[family]
                         + r["finetune_epochs"] * step_cpu[f"finetune_{family}"])
        measured = (4 * r["eval_images"] / 500 * unit["inference_batch500"]
                    + 2 * r["bn_batches"] * unit["bn_batch128"])
        fixed[family] = max(0.0, c["total"] - c["stability"] - steps_cpu - measured)
    step_cpu["finetune"] = float(np.mean([v for k, v in step_cpu.items()
                                          if k.startswith("finetune_")]))
    n = FLAGS.steps_per_epoch or 50_000 // 128
    s, f = FLAGS.search_epochs, FLAGS.finetune_epochs
    swaps = (len(FLAGS.swap_bits) if FLAGS.swap_bits else len(CANDIDATE_BITS) - 1) * \
        unit["searchable_layers"]
    per_method = (4 * 10_000 / 500 * unit["inference_batch500"]
                  + 2 * FLAGS.bn_batches * unit["bn_batch128"]
                  + (swaps + 2 + len(CANDIDATE_BITS)) * unit["stability_pass"]
                  + n * f * step_cpu["finetune"])
    search = {"uniform": step_cpu["uniform"], "joint": step_cpu["joint"],
              "metamix": step_cpu["metamix"],
              "metamix_wsearch": step_cpu["metamix"] + step_cpu["joint"],
              "joint_walltime": step_cpu["metamix"], "metamix_split": step_cpu["metamix"]}
    base = {"uniform": "uniform", "joint": "joint", "metamix": "metamix",
            "metamix_wsearch": "metamix", "joint_walltime": "joint",
            "metamix_split": "metamix"}
    cost = {k: fixed[base[k]] + per_method + n * s * v for k, v in search.items()}
    methods = method_list([int(x) for x in FLAGS.seeds])
    total = sum(cost[m["family"]] for m in methods)
    quiet_wall_per_cpu = 1 / FLAGS.quiet_float_images_per_s / unit["float_train_image"]
    unit = {k: v for k, v in unit.items() if k != "searchable_layers"}
    return {"unit_cpu_s": unit, "step_cpu_s": step_cpu, "fixed_cpu_s": fixed,
            "method_cpu_s": cost, "methods": len(methods), "total_cpu_h": total / 3600,
            "quiet_wall_per_cpu_s": quiet_wall_per_cpu,
            "total_quiet_wall_h": total / 3600 * quiet_wall_per_cpu,
            "settings": {"steps_per_epoch": n, "search_epochs": s, "finetune_epochs": f,
                         "seeds": FLAGS.seeds, "bn_batches": FLAGS.bn_batches,
                         "stability_images": FLAGS.stability_images, "swaps": swaps}}


def main(argv):
    del argv
    if FLAGS.estimate:
        print(json.dumps(estimate(FLAGS.estimate), indent=1))
    elif FLAGS.report:
        report()
    else:
        run_study()


if __name__ == "__main__":
    app.run(main)
