"""Bit searchers: what one search iteration does and how the bits are read after an epoch.

Every searcher has one interface, used by :func:`metamix_tf.search` (and so by the
pipeline's search phase):

* ``target(cost, requested)``: the GBOPs target it works towards;
* ``make_epoch_step(setup)``: ``epoch -> step(images, labels)``, built once from the
  :class:`SearchSetup` (model, optimizers, cost model, target);
* ``searched(epoch)``: whether the bits after ``epoch`` come from the bit logits (argmax,
  lowered to the target) or are the searcher's ``uniform_bits``.

:class:`MetaMix` (bit-meta, then bit-search from the end of the warm-up), :class:`Joint`
(EdMIPS/DNAS: weights and logits on one mixture tape) and :class:`Uniform` (uniform LSQ at
one bit-width: no search, weights and step sizes trained for the same epochs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from metamix_tf.quant import wrap
from metamix_tf.quant.cost import CostModel
from metamix_tf.training import steps

__all__ = ["SEARCHERS", "SearchSetup", "Searcher", "MetaMix", "Joint", "Uniform",
           "get_searcher"]


@dataclasses.dataclass
class SearchSetup:
    """What a searcher's step functions are built from."""

    strategy: tf.distribute.Strategy
    model: object
    groups: wrap.VariableGroups
    cost: CostModel
    target: float
    candidate_bits: Sequence[int]
    uniform_bits: int  # the bits of the searcher's non-searched epochs
    weight_optimizer: object
    alpha_optimizer: object | None
    cost_weight: float
    step_kwargs: dict  # teacher, kd_temperature, jit_compile
    # weights' optimizer of the bit-search step, for a searcher whose
    # search_weight_steps() > 0 (MetaMix's fixed-meta-state ablation)
    search_weight_optimizer: object | None = None


class Searcher:
    """The interface (module docstring); subclasses set ``name``."""

    name = ""

    def target(self, cost: CostModel, requested: float | None) -> float:
        if requested is None:
            raise ValueError(f"The '{self.name}' searcher needs a GBOPs target "
                             "(target_gbops or target_avg_bits). Received: target=None")
        return requested

    def uniform_bits(self, cost: CostModel, candidates: Sequence[int], target: float) -> int:
        """The candidate whose uniform GBOPs is nearest the target."""
        return min(candidates, key=lambda b: abs(cost.uniform_gbops(b) - target))

    def searched(self, epoch: int) -> bool:
        return True

    def search_weight_steps(self, epochs: int, steps_per_epoch: int) -> int:
        """How many steps a second weight optimizer (``SearchSetup.search_weight_optimizer``)
        takes; 0: the searcher needs none."""
        return 0

    def make_epoch_step(self, setup: SearchSetup) -> Callable:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class MetaMix(Searcher):
    """Per iteration a bit-meta step (weights, every candidate in turn) then a bit-search
    step (logits on the mixture, weights fixed); bit-meta only during the warm-up.

    ``update_weights_in_search=True`` is the paper's fixed-meta-state ablation (reported
    0.46 points below MetaMix): the bit-search step also steps the weights and step sizes
    on the mixture loss (:func:`metamix_tf.training.steps.make_joint_step` with the BatchNorm moving
    statistics frozen as in the bit-search step), with their own optimizer
    (``SearchSetup.search_weight_optimizer``, a cosine over the bit-search steps) so that
    the bit-meta step's schedule is the same as without the option.
    """

    name = "metamix"

    def __init__(self, warmup_epochs: int = 1, meta_batch: str = "full",
                 update_weights_in_search: bool = False, meta_candidates: int | None = None,
                 seed: int = 0):
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError("`warmup_epochs` must be an integer >= 0. "
                             f"Received: warmup_epochs={warmup_epochs!r}")
        if meta_batch not in steps.META_BATCH:
            raise ValueError(f"`meta_batch` must be one of {steps.META_BATCH}. "
                             f"Received: meta_batch={meta_batch!r}")
        self.warmup_epochs = warmup_epochs
        if meta_candidates is not None and (isinstance(meta_candidates, bool) or not isinstance(
                meta_candidates, int) or meta_candidates < 1):
            raise ValueError("`meta_candidates` must be None (every candidate) or an integer "
                             f">= 1. Received: meta_candidates={meta_candidates!r}")
        self.meta_batch = meta_batch
        self.update_weights_in_search = bool(update_weights_in_search)
        self.meta_candidates = meta_candidates
        self.seed = int(seed)

    def search_weight_steps(self, epochs: int, steps_per_epoch: int) -> int:
        if not self.update_weights_in_search:
            return 0
        return max(epochs - self.warmup_epochs, 1) * steps_per_epoch

    def fit_warmup(self, epochs: int) -> int | None:
        """Shortens the warm-up to leave one bit-search epoch; returns the new length when
        it changed."""
        if self.warmup_epochs >= epochs:
            self.warmup_epochs = epochs - 1
            return self.warmup_epochs
        return None

    def searched(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def make_epoch_step(self, setup: SearchSetup) -> Callable:
        s = setup
        meta = steps.make_meta_step(s.strategy, s.model, s.weight_optimizer,
                                    s.groups.weights_and_steps, s.candidate_bits,
                                    meta_batch=self.meta_batch,
                                    meta_candidates=self.meta_candidates, seed=self.seed,
                                    **s.step_kwargs)
        if not s.groups.alphas:
            search = None
        elif self.update_weights_in_search:
            if s.search_weight_optimizer is None:
                raise ValueError("MetaMix(update_weights_in_search=True) needs "
                                 "SearchSetup.search_weight_optimizer. Received: None")
            search = steps.make_joint_step(
                s.strategy, s.model, s.search_weight_optimizer, s.groups.weights_and_steps,
                s.alpha_optimizer, s.groups.alphas, s.cost, s.target, s.cost_weight,
                freeze_batch_norm=True, **s.step_kwargs)
        else:
            search = steps.make_search_step(
                s.strategy, s.model, s.alpha_optimizer, s.groups.alphas, s.cost, s.target,
                s.cost_weight, **s.step_kwargs)

        def both(images, labels):
            out = meta(images, labels)
            out.update({f"search_{k}": v for k, v in search(images, labels).items()})
            return out

        warmup = self.warmup_epochs
        return lambda epoch: meta if epoch < warmup or search is None else both

    def describe(self) -> str:
        extras = [", split-batch bit-meta"] if self.meta_batch == "split" else []
        if self.meta_candidates is not None:
            extras.append(f", bit-meta on {self.meta_candidates} drawn candidate(s) per step")
        if self.update_weights_in_search:
            extras.append(", weights also stepped in the bit-search step")
        return f"{self.name} ({self.warmup_epochs} warm-up epoch(s){''.join(extras)})"


class Joint(Searcher):
    """EdMIPS/DNAS baseline: weights and logits stepped together on the mixture."""

    name = "joint"

    def make_epoch_step(self, setup: SearchSetup) -> Callable:
        s = setup
        if s.groups.alphas:
            joint = steps.make_joint_step(s.strategy, s.model, s.weight_optimizer,
                                          s.groups.weights_and_steps, s.alpha_optimizer,
                                          s.groups.alphas, s.cost, s.target, s.cost_weight,
                                          **s.step_kwargs)
        else:
            joint = steps.make_train_step(s.strategy, s.model, s.weight_optimizer,
                                          s.groups.weights_and_steps,
                                          configure=lambda: wrap.set_mode(s.model, "mixture"),
                                          **s.step_kwargs)
        return lambda epoch: joint


class Uniform(Searcher):
    """Uniform LSQ: every searchable layer at ``bits``; weights and step sizes trained."""

    name = "uniform"

    def __init__(self, bits: int = 4):
        self.bits = int(bits)

    def target(self, cost: CostModel, requested: float | None) -> float:
        return cost.uniform_gbops(float(self.bits))  # no search: what the bits cost

    def uniform_bits(self, cost, candidates, target) -> int:
        return self.bits

    def searched(self, epoch: int) -> bool:
        return False

    def make_epoch_step(self, setup: SearchSetup) -> Callable:
        s = setup
        lsq = steps.make_train_step(s.strategy, s.model, s.weight_optimizer,
                                    s.groups.weights_and_steps,
                                    configure=lambda: wrap.set_uniform(s.model, self.bits),
                                    **s.step_kwargs)
        return lambda epoch: lsq

    def describe(self) -> str:
        return f"{self.name} ({self.bits}-bit)"


SEARCHERS = {"metamix": MetaMix, "joint": Joint, "uniform": Uniform}


def get_searcher(searcher, *, warmup_epochs: int = 1, uniform_bits: int = 4,
                 meta_batch: str = "full", meta_candidates: int | None = None,
                 seed: int = 0) -> Searcher:
    """A :class:`Searcher` from its name (``"metamix"``, ``"joint"``, ``"uniform"``) or
    the object itself."""
    if isinstance(searcher, Searcher):
        return searcher
    if searcher == "metamix":
        return MetaMix(warmup_epochs, meta_batch, meta_candidates=meta_candidates, seed=seed)
    if searcher == "joint":
        return Joint()
    if searcher == "uniform":
        return Uniform(uniform_bits)
    raise ValueError(f"`searcher` must be one of {sorted(SEARCHERS)} or a Searcher. "
                     f"Received: searcher={searcher!r}")
