"""Search settings shared by both searchers: cost normalisation, the alpha learning-rate
rule and the initial bit logits (issue 12, item 1).

Pure functions of config values; the phase code calls them with what it knows (target,
steps per epoch, candidate bits), so MetaMix and the joint searcher get the same rules:

* :func:`relative_cost_weight`: the ``lambda`` that :func:`metamix_tf.training.losses.cost_penalty`
  in its relative form needs to compute ``search.cost_normalization``'s penalty;
* :func:`alpha_steps` and :func:`alpha_learning_rate`: ``search.alpha_lr_rule`` =
  ``"displacement"`` sets the alpha lr to ``alpha_displacement / alpha steps``. Adam moves a
  logit by about ``lr`` per step whatever the gradient's scale, so ``lr x steps`` bounds how
  far a logit can travel in a search. The paper's ImageNet search: lr 1e-4 over one
  bit-search epoch of ~5,000 steps (batch 256), about 0.5;
* :func:`tie_break_logits` / :func:`set_initial_alphas`: the alphas start with a small
  bias (``search.alpha_init_bias``) toward the uniform bit-width nearest the target, so that
  argmax does not send every layer to ``candidate_bits[0]`` at step 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "ALPHA_LR_RULES",
    "COST_NORMALIZATIONS",
    "alpha_learning_rate",
    "alpha_steps",
    "relative_cost_weight",
    "set_initial_alphas",
    "tie_break_logits",
]

COST_NORMALIZATIONS = ("relative", "absolute")
ALPHA_LR_RULES = ("fixed", "displacement")


def relative_cost_weight(cost_weight: float, target: float,
                         normalization: str = "relative") -> float:
    """The weight to give the relative penalty ``w * |G - T| / T`` so that it equals the
    ``normalization`` form of ``cost_weight * ...``.

    ``"relative"``: ``cost_weight`` itself; ``"absolute"`` (the paper's
    ``lambda * |G - T|`` in GBOPs): ``cost_weight * target``. At the ImageNet target of 5.12
    GBOPs the absolute lambda = 4 is 5.1x the relative lambda = 4; below a 1 GBOPs target
    (CIFAR models at 32 px) it is weaker than the relative one.
    """
    if normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"`cost_normalization` must be one of {COST_NORMALIZATIONS}. "
                         f"Received: cost_normalization={normalization!r}")
    if not target > 0:
        raise ValueError(f"The GBOPs target must be > 0. Received: target={target}")
    if cost_weight < 0:
        raise ValueError(f"`cost_weight` must be >= 0. Received: cost_weight={cost_weight}")
    return float(cost_weight) * (float(target) if normalization == "absolute" else 1.0)


def alpha_steps(searcher: str, epochs: int, warmup_epochs: int, steps_per_epoch: int) -> int:
    """How many optimizer steps the alphas get in a search.

    ``"metamix"``: one bit-search step per iteration after the warm-up epochs (the warm-up
    is cut to ``epochs - 1`` as the search phase does); ``"joint"``: every step of every
    epoch; ``"none"``: 0.
    """
    if searcher not in ("metamix", "joint", "none"):
        raise ValueError("`searcher` must be 'metamix', 'joint' or 'none'. "
                         f"Received: searcher={searcher!r}")
    for name, value in (("epochs", epochs), ("warmup_epochs", warmup_epochs),
                        ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0. Received: {name}={value!r}")
    if searcher == "none":
        return 0
    if searcher == "metamix":
        searched = epochs - min(warmup_epochs, max(epochs - 1, 0))
        return int(searched * steps_per_epoch)
    return int(epochs * steps_per_epoch)


def alpha_learning_rate(rule: str, learning_rate: float, displacement: float,
                        steps: int) -> float:
    """The alpha learning rate: ``learning_rate`` for ``rule="fixed"``, else
    ``displacement / steps`` (``"displacement"``: ``lr x steps = displacement``)."""
    if rule not in ALPHA_LR_RULES:
        raise ValueError(f"`alpha_lr_rule` must be one of {ALPHA_LR_RULES}. "
                         f"Received: alpha_lr_rule={rule!r}")
    if rule == "fixed":
        return float(learning_rate)
    if not displacement > 0:
        raise ValueError(f"`alpha_displacement` must be > 0. "
                         f"Received: alpha_displacement={displacement}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError("The displacement rule needs at least one alpha step. "
                         f"Received: steps={steps!r}")
    return float(displacement) / float(steps)


def tie_break_logits(candidate_bits: Sequence[int], preferred_bits: int,
                     bias: float) -> np.ndarray:
    """Initial bit logits: 0 everywhere, ``bias`` at ``preferred_bits``.

    With ``bias > 0``, argmax at step 0 is ``preferred_bits`` (the uniform bit-width nearest
    the target) instead of the tie's first index, the lowest bits; a small bias (e.g. 0.01)
    leaves the mixture's softmax almost uniform. ``bias = 0`` gives the all-zero start.
    """
    bits = [int(b) for b in candidate_bits]
    if preferred_bits not in bits:
        raise ValueError(f"`preferred_bits` must be one of the candidate bits {bits}. "
                         f"Received: preferred_bits={preferred_bits!r}")
    if bias < 0:
        raise ValueError(f"`alpha_init_bias` must be >= 0. Received: alpha_init_bias={bias}")
    logits = np.zeros(len(bits), dtype=np.float32)
    logits[bits.index(int(preferred_bits))] = bias
    return logits


def set_initial_alphas(model, preferred_bits: int, bias: float) -> int:
    """Assigns :func:`tie_break_logits` to the alpha of every searchable activation quantizer
    of a wrapped ``model``; returns how many were set. Call it on a fresh start (a restored
    checkpoint overwrites the alphas anyway)."""
    from metamix_tf.quant import wrap

    count = 0
    for layer in wrap.quant_layers(model):
        q = layer.input_quantizer
        if q is not None and q.searchable:
            q.alpha.assign(tie_break_logits(q.candidate_bits, preferred_bits, bias))
            count += 1
    return count
