"""A defense's search space: the knobs that audit.py tune searches (each defense class declares its own as
`search_space`), and a trial's knob values turned into the defense's flags on the data at hand.

A knob's range is in its flag's own units, or relative to the data, so one space fits every dataset: a window's
stride and width as a share of the smallest class, `--mem_thre` as a quantile of the mem-scores in use.
"""

import math
from dataclasses import dataclass

import numpy as np

SMALLEST_CLASS = "share of the smallest class"  # the value times the smallest class's samples, rounded, >= 1
QUANTILE = "quantile of the mem-scores"  # the mem-scores' value at that quantile (linear interpolation)


@dataclass(frozen=True)
class Knob:
    """One tunable flag of a defense: its range [low, high], on a log scale or not, in `unit` ('' for the flag's
    own units, SMALLEST_CLASS or QUANTILE)."""

    flag: str
    low: float
    high: float
    log: bool = False
    unit: str = ""

    def __post_init__(self):
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"knob {self.flag}: the range [{self.low}, {self.high}] is empty (or <= 0 on a log scale)")


def flags_of(space, values: dict, class_sizes, scores=None) -> dict:
    """{flag: value} for a trial's knob values (knob flag -> value in the knob's unit): a share of the smallest
    class becomes a whole number of samples (at least 1), a quantile the mem-scores' value there, a value in the
    flag's own units is rounded to 3 significant digits."""
    flags = {}
    for knob in space:
        value = values[knob.flag]
        if knob.unit == SMALLEST_CLASS:
            flags[knob.flag] = max(1, math.floor(value * min(class_sizes) + 0.5))
        elif knob.unit == QUANTILE:
            flags[knob.flag] = float(np.quantile(np.asarray(scores, dtype=np.float64), value))
        else:  # 3 significant digits: a value one can type, and a short name where it is part of one
            flags[knob.flag] = float(f"{value:.3g}")
    return flags
