"""The CIFAR-10 study: accuracy per GBOP, search cost and activation stability of MetaMix
against uniform LSQ and the joint (EdMIPS/DNAS-style) searcher, MobileNet-v2 at 32x32.

    unzip -q ../shared/data/cifar10-jpeg.zip -d /tmp/cifar10
    python benchmarks/cifar10_study.py --data=folder:/tmp/cifar10 --budget=small

One float pre-training is shared by every method (same checkpoint, data order, seed and
weight-training schedule). Methods: uniform LSQ at A3/A4/A8 (W4), and the joint searcher
and MetaMix at the GBOPs of uniform A4W4 and A3W4. Everything runs through
``metamix_tf.pipeline.run``; this script only sets the configs, collects the run
directories' JSON, measures activation stability (``metamix_tf.analysis.stability``) and plots.
Results go to ``docs/results/cifar10_<budget>[_seed<N>].json``, the per-layer stability
shifts to ``..._stability_per_layer.json``, and PNGs beside them. Rerunning the same command
reuses finished phases (each run directory has ``<phase>.done``), so it only re-collects and
re-measures.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from metamix_tf import config as config_lib  # noqa: E402
from metamix_tf import data as data_lib  # noqa: E402
from metamix_tf import models, pipeline  # noqa: E402
from metamix_tf.analysis import stability  # noqa: E402
from metamix_tf.quant import wrap  # noqa: E402
from metamix_tf.quant.cost import CostModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", "folder:/tmp/cifar10", "folder:PATH of the unzipped CIFAR-10 "
                    "JPEGs, or the TFDS name cifar10.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (for --data=cifar10).")
flags.DEFINE_enum("budget", "small", ["smoke", "small", "full"],
                  "smoke: a few minutes, checks the setup (numbers mean nothing); small: <= ~60 "
                  "min on 2 CPU cores; full: all 50,000 images, more epochs, 3 seeds (a GPU).")
flags.DEFINE_string("work_dir", "runs/cifar10_study", "Where the run directories go.")
flags.DEFINE_string("results_dir", "docs/results", "Where JSON and PNGs are written.")
flags.DEFINE_list("methods", None, "Subset of methods to run (default: all).")
flags.DEFINE_float("alpha_learning_rate", None, "Bit-logit learning rate of both searchers "
                   "(default: the config's); set for joint and MetaMix alike.")
flags.DEFINE_float("cost_weight", None, "GBOPs penalty weight lambda of both searchers "
                   "(default: the config's).")
flags.DEFINE_bool("snap_biases", False, "Train the biases on the int8 grid and snap them "
                  "(finetune.bias_grid_epochs, finetune.snap_biases). Off: the study "
                  "compares bit selection, and the committed small-budget results were made "
                  "without it.")
flags.DEFINE_string("tag", "", "Suffix of the searchers' run directories and of the result "
                    "files, for a variant (the float and uniform runs, which have no bit "
                    "logits, are shared).")

# Budgets. The small one is a stratified subset with short schedules; every method gets the
# same search and weight-training epochs.
BUDGETS = {
    "smoke": dict(seeds=(0,), max_train=1024, max_eval=512, pretrain_epochs=1,
                  search_epochs=1, warmup_epochs=0, finetune_epochs=1),
    "small": dict(seeds=(0,), max_train=10_000, max_eval=2_000, pretrain_epochs=12,
                  search_epochs=3, warmup_epochs=1, finetune_epochs=3),
    "full": dict(seeds=(0, 1, 2), max_train=None, max_eval=None, pretrain_epochs=60,
                 search_epochs=10, warmup_epochs=2, finetune_epochs=30),
}
CANDIDATE_BITS = (2, 3, 4, 8)
STABILITY_IMAGES = 256
HISTOGRAM_LAYER = "block_1_depthwise"  # an early depthwise conv whose input depends on bits


def methods(cost: CostModel) -> list[dict]:
    """(name, searcher, uniform bits or GBOPs target) of every method in the study."""
    out = [dict(name=f"uniform_a{b}", searcher="none", bits=b, target=None)
           for b in (3, 4, 8)]
    for b in (4, 3):
        target = cost.uniform_gbops(b)
        out += [dict(name=f"joint_a{b}", searcher="joint", bits=None, target=target),
                dict(name=f"metamix_a{b}", searcher="metamix", bits=None, target=target)]
    return out


def base_config(budget: dict, seed: int) -> config_lib.ExperimentConfig:
    config = config_lib.load(["configs/cifar10_mobilenet_v2.yaml"])
    config.seed = seed
    config.data.seed = seed
    config.data.dataset = FLAGS.data
    config.data.data_dir = FLAGS.data_dir
    config.data.max_train_examples = budget["max_train"]
    config.data.max_eval_examples = budget["max_eval"]
    config.quant = config_lib.QuantConfig(**{**config_lib.to_dict(config.quant),
                                             "candidate_bits": CANDIDATE_BITS})
    config.pretrain.epochs = budget["pretrain_epochs"]
    config.search.epochs = budget["search_epochs"]
    config.search.warmup_epochs = budget["warmup_epochs"]
    config.finetune.epochs = budget["finetune_epochs"]
    config.finetune.snap_biases = FLAGS.snap_biases
    config.finetune.bias_grid_epochs = None if FLAGS.snap_biases else 0
    if FLAGS.alpha_learning_rate is not None:
        config.search.alpha_learning_rate = FLAGS.alpha_learning_rate
    if FLAGS.cost_weight is not None:
        config.search.cost_weight = FLAGS.cost_weight
    return config


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def measure_stability(run_dir: str, images: np.ndarray) -> dict:
    """Activation/BN statistic shifts of the searched model across candidate bit-widths,
    relative to 8 bits, plus histograms of one early depthwise layer."""
    model = keras.saving.load_model(os.path.join(run_dir, "search.keras"), compile=False)
    shift = stability.activation_shift(model, images, reference=max(CANDIDATE_BITS))
    hist = stability.activation_histograms(model, images, HISTOGRAM_LAYER,
                                           bits_list=list(CANDIDATE_BITS))
    return dict(mean=shift["mean"], per_layer=shift["per_layer"], histogram=hist)


def plot_accuracy_vs_gbops(rows: list[dict], float_acc: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"none": ("uniform LSQ", "tab:gray", "s"), "joint": ("joint (EdMIPS/DNAS)",
              "tab:orange", "^"), "metamix": ("MetaMix", "tab:blue", "o")}
    for searcher, (label, color, marker) in styles.items():
        pts = sorted((r["gbops"], 100 * r["final_acc"]) for r in rows
                     if r["searcher"] == searcher)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=label)
    ax.axhline(100 * float_acc, color="k", ls="--", lw=1, label="float")
    ax.set_xlabel("GBOPs (4-bit weights; first/last layer 8-bit)")
    ax.set_ylabel("top-1 after weight training (%)")
    ax.set_title("CIFAR-10, MobileNet-v2 32x32", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bits_pair(reports: dict, path: str) -> None:
    """Selected bits per layer of two methods side by side, with each layer's MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    layers = reports[names[0]]["layers"]
    x = np.arange(len(layers))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.24 * len(layers) + 2), 4.6))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width,
               [r["a_bits"] for r in reports[name]["layers"]], width=width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in layers], rotation=90, fontsize=6)
    ax.set_ylabel("activation bits")
    twin = ax.twinx()
    twin.plot(x, [max(r["macs"], 1) for r in layers], color="tab:red", marker=".", lw=1)
    twin.set_yscale("log")
    twin.set_ylabel("MACs", color="tab:red")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stability_per_layer(stab: dict, path: str, bits: int = 2) -> None:
    """Per-layer shift (relative to 8 bits) of the quantizer-input variance and of the
    recomputed BatchNorm means when every layer is switched to ``bits``, one line per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9.0, 5.6), sharex=False)
    for name, result in stab.items():
        layers = result["per_layer"][bits]
        for ax, metric in zip(axes, ("input_var_shift", "bn_mean_shift"), strict=True):
            values = [e[metric] for e in layers.values() if metric in e and e["depends_on_bits"]]
            ax.plot(values, marker=".", lw=1, label=name)
    axes[0].set_ylabel("|log var ratio|\nquantizer input")
    axes[1].set_ylabel("|mean shift| / std\nBatchNorm (recomputed)")
    axes[1].set_xlabel("layer (graph order; layers whose input depends on the bits)")
    axes[0].set_title(f"Statistic shift at {bits} bits vs 8 bits, after bit selection",
                      fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict], float_acc: float) -> str:
    head = ("| method | target GBOPs | GBOPs | avg A bits | top-1 after search | "
            "top-1 after weight training | search s | weight training s |")
    lines = [head, "|" + "---|" * 8, f"| float | - | - | 32 | - | {100 * float_acc:.2f} | - | - |"]
    for r in rows:
        target = "-" if r["target_gbops"] is None else f"{r['target_gbops']:.4f}"
        lines.append(
            f"| {r['method']} | {target} | {r['gbops']:.4f} | {r['avg_bits']:.2f} | "
            f"{100 * r['search_acc']:.2f} | {100 * r['final_acc']:.2f} | "
            f"{r['search_s']:.0f} | {r['finetune_s']:.0f} |")
    return "\n".join(lines)


def run_seed(budget_name: str, budget: dict, seed: int) -> dict:
    work = os.path.join(FLAGS.work_dir, f"{budget_name}_seed{seed}")
    config = base_config(budget, seed)
    began = time.time()

    # 1. One float pre-training shared by every method.
    float_cfg = copy.deepcopy(config)
    float_cfg.model_dir = os.path.join(work, "float")
    float_summary = pipeline.run(float_cfg, "pretrain")
    float_weights = os.path.join(float_cfg.model_dir, "float.keras")

    data = data_lib.load(config.data, preprocess=models.preprocess_input(config.model.name))
    images = np.concatenate([x.numpy() for x, _ in data.eval.take(
        -(-STABILITY_IMAGES // config.data.eval_batch_size))])[:STABILITY_IMAGES]
    shape_model = wrap.apply(models.build(config.model.name, data.image_shape,
                                          data.num_classes), config.quant)
    cost = CostModel(shape_model)

    # 2. Every method from the same float checkpoint, then the same weight training.
    rows, stab, reports = [], {}, {}
    selected = FLAGS.methods
    for m in methods(cost):
        if selected and m["name"] not in selected:
            continue
        cfg = copy.deepcopy(config)
        cfg.model.weights = float_weights
        tag = f"_{FLAGS.tag}" if FLAGS.tag and m["searcher"] != "none" else ""
        cfg.model_dir = os.path.join(work, m["name"] + tag)
        cfg.search.searcher = m["searcher"]
        if m["bits"] is not None:
            cfg.search.uniform_bits = m["bits"]
        cfg.search.target_gbops = m["target"]
        summary = pipeline.run(cfg, "all")
        bits = _read(os.path.join(cfg.model_dir, "bits.json"))
        reports[m["name"]] = bits["report"]
        rows.append(dict(
            method=m["name"], searcher=m["searcher"], target_gbops=m["target"],
            gbops=summary["gbops"], avg_bits=summary["avg_activation_bits"],
            search_acc=summary["search_val_acc"], final_acc=summary["final_val_acc"],
            search_s=summary["wall_time_s"]["search"],
            finetune_s=summary["wall_time_s"]["finetune"], bits=bits["bits"]))
        stab[m["name"]] = measure_stability(cfg.model_dir, images)
        print(format_table(rows, float_summary["float_val_acc"]), flush=True)

    return dict(seed=seed, float_acc=float_summary["float_val_acc"],
                pretrain_s=float_summary["wall_time_s"]["pretrain"], rows=rows,
                stability=stab, bit_reports=reports, wall_time_s=time.time() - began,
                train_size=data.train_size, eval_size=data.eval_size, dataset=data.name)


def main(argv):
    del argv
    budget = BUDGETS[FLAGS.budget]
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    for seed in budget["seeds"]:
        result = run_seed(FLAGS.budget, budget, seed)
        result.update(budget=FLAGS.budget, budget_settings=budget,
                      candidate_bits=CANDIDATE_BITS,
                      alpha_learning_rate=base_config(budget, seed).search.alpha_learning_rate,
                      cost_weight=base_config(budget, seed).search.cost_weight,
                      machine=dict(
                          platform=platform.platform(), processor=platform.processor(),
                          cpu_count=os.cpu_count()),
                      command=" ".join(["python benchmarks/cifar10_study.py",
                                        f"--data={FLAGS.data}", f"--budget={FLAGS.budget}"]
                                       + ([f"--alpha_learning_rate={FLAGS.alpha_learning_rate}"]
                                          if FLAGS.alpha_learning_rate is not None else [])
                                       + ([f"--cost_weight={FLAGS.cost_weight}"]
                                          if FLAGS.cost_weight is not None else [])
                                       + ([f"--tag={FLAGS.tag}"] if FLAGS.tag else [])))
        stem = os.path.join(FLAGS.results_dir, f"cifar10_{FLAGS.budget}"
                            + (f"_{FLAGS.tag}" if FLAGS.tag else "")
                            + (f"_seed{seed}" if len(budget["seeds"]) > 1 else ""))
        hists = [(f"{name}: {HISTOGRAM_LAYER} input", result["stability"][name]["histogram"])
                 for name in ("metamix_a4", "joint_a4") if name in result["stability"]]
        if hists:
            stability.plot_histograms(hists, stem + "_histograms.png")
        pair = {k: result["bit_reports"][k] for k in ("metamix_a4", "joint_a4")
                if k in result["bit_reports"]}
        if pair:
            plot_bits_pair(pair, stem + "_bits.png")
        plot_accuracy_vs_gbops(result["rows"], result["float_acc"], stem + "_accuracy.png")
        table = format_table(result["rows"], result["float_acc"])
        stab_lines = ["| method | bits | input mean shift | input var shift | BN mean shift | "
                      "BN var shift |", "|---|---|---|---|---|---|"]
        for name, s in result["stability"].items():
            for b, v in s["mean"].items():
                stab_lines.append(
                    f"| {name} | {b} | {v['input_mean_shift']:.4f} | {v['input_var_shift']:.4f}"
                    f" | {v['bn_mean_shift']:.4f} | {v['bn_var_shift']:.4f} |")
        result["table_markdown"] = table
        result["stability_markdown"] = "\n".join(stab_lines)
        pair = {k: result["stability"][k] for k in ("metamix_a4", "joint_a4")
                if k in result["stability"]}
        if pair:
            plot_stability_per_layer(pair, stem + "_stability.png")
        per_layer = {name: s.pop("per_layer") for name, s in result["stability"].items()}
        with open(stem + "_stability_per_layer.json", "w") as f:
            json.dump(per_layer, f, indent=1, default=lambda v: np.asarray(v).tolist())
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1, default=lambda v: np.asarray(v).tolist())
        print(table)
        print(result["stability_markdown"])
        print(f"wrote {stem}.json and PNGs; total {result['wall_time_s'] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
