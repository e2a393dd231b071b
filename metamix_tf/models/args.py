"""Argument checks shared by the model builders: one clear line per bad value."""

from __future__ import annotations

import numpy as np

__all__ = ["check_fraction", "check_input_shape", "check_num_classes"]


def check_input_shape(input_shape) -> tuple:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (shape is None or len(shape) != 3
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                       for d in shape)):
        raise ValueError("`input_shape` must be (height, width, channels) with positive integers. "
                         f"Received: input_shape={input_shape!r}")
    return tuple(int(d) for d in shape)


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError("`num_classes` must be an integer >= 2. "
                         f"Received: num_classes={num_classes!r}")
    return int(num_classes)


def check_fraction(arg: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{arg}` must be a float in [0, 1). Received: {arg}={value!r}")
    return float(value)
