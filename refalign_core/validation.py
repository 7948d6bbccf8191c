"""The one set of value checks behind typed inputs (`SamplingSettings`, training configs): each returns the value
normalised or raises one RefAlignInputError that starts with `what` (an input's name, or "config FILE: key.path")."""

import math

import numpy as np

from .errors import RefAlignInputError


def describe(value) -> str:
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"{value!r} ({type(value).__name__})"


def in_range(what: str, value, minimum=None, maximum=None, exclusive_minimum: bool = False,
             exclusive_maximum: bool = False):
    """`value` within the bounds (None: unbounded), or one error stating them."""
    low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    high = maximum is not None and (value >= maximum if exclusive_maximum else value > maximum)
    if low or high:
        if minimum is not None and maximum is not None and not (exclusive_minimum or exclusive_maximum):
            bounds = f"in [{minimum}, {maximum}]"
        elif low:
            bounds = f"{'>' if exclusive_minimum else '≥'} {minimum}"
        else:
            bounds = f"{'<' if exclusive_maximum else '≤'} {maximum}"
        raise RefAlignInputError(f"{what}: must be {bounds}, got {value}")
    return value


def whole_number(what: str, value, minimum=None, maximum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RefAlignInputError(f"{what}: expected a whole number, got {describe(value)}")
    return in_range(what, int(value), minimum, maximum)


def finite_number(what: str, value, minimum=None, maximum=None, exclusive_minimum: bool = False,
                  exclusive_maximum: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RefAlignInputError(f"{what}: expected a number, got {describe(value)}")
    if not math.isfinite(value):
        raise RefAlignInputError(f"{what}: must be a finite number, got {value}")
    return in_range(what, float(value), minimum, maximum, exclusive_minimum, exclusive_maximum)


def one_of(what: str, value, options) -> object:
    if value not in options:
        raise RefAlignInputError(f"{what}: must be one of {', '.join(map(repr, options))}, got {describe(value)}")
    return value
