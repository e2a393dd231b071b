"""Stochastic weight averaging (SWA; Izmailov et al., "Averaging Weights Leads to Wider Optima
and Better Generalization", UAI 2018): the running mean of a model's weights taken at epoch
ends of a constant (or cyclic) learning rate, kept in variables so a checkpoint resumes it.

The mean is an equal-weight average of the snapshots, ``m_n = m_{n-1} + (w_n - m_{n-1}) / n``
(no gradient flows through it). BatchNorm moving statistics are not averaged: after
:meth:`WeightAverage.assign_to`, re-estimate them at the averaged weights
(:func:`metamix_tf.analysis.evaluation.reestimate_batch_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

__all__ = ["WeightAverage"]


class WeightAverage(tf.Module):
    """Equal-weight running mean of ``variables`` over the :meth:`update` calls.

    A ``tf.Module``: put it in the run's ``tf.train.Checkpoint`` (e.g. ``swa=average``) and a
    resumed run continues the same mean. Holds one float copy per variable.
    """

    def __init__(self, variables: Sequence[tf.Variable], name: str = "weight_average"):
        super().__init__(name=name)
        if not variables:
            raise ValueError("WeightAverage needs at least one variable. Received: none")
        self._sources = list(variables)
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")
        self.means = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                  name=f"mean_{i}") for i, v in enumerate(self._sources)]

    def start_from(self, values: Sequence[tf.Tensor], count: int) -> None:
        """Sets the mean to ``values`` as if ``count`` snapshots were averaged already (continues
        a mean that another run wrote; a checkpoint restored afterwards overrides it)."""
        if count < 1:
            raise ValueError(f"start_from needs count >= 1 snapshots. Received: {count}")
        if len(values) != len(self.means):
            raise ValueError(f"start_from needs {len(self.means)} values, one per variable. "
                             f"Received: {len(values)}")
        for mean, value in zip(self.means, values, strict=True):
            mean.assign(value)
        self.count.assign(count)

    def update(self) -> int:
        """Adds the variables' current values as one snapshot; returns the snapshot count."""
        n = self.count + 1
        for mean, source in zip(self.means, self._sources, strict=True):
            mean.assign_add((tf.convert_to_tensor(source) - mean) / tf.cast(n, mean.dtype))
        self.count.assign_add(1)
        return int(self.count.numpy())

    def assign_to(self) -> None:
        """Copies the mean into the variables (raises before the first snapshot)."""
        if int(self.count.numpy()) == 0:
            raise ValueError("No snapshot was averaged yet: call update() at least once.")
        for mean, source in zip(self.means, self._sources, strict=True):
            source.assign(mean)
