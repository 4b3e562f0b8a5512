"""Settings and the data: `--stride auto`, `--width auto`, `--mem_thre auto` derived from it (docs/defenses.md), and
the log line that says what a window means on it (window_rule).

The rules, exactly. c is the number of samples in the smallest class of the victim's training set; the scores
are the mem-scores of the whole training set (one per training sample, the file the defenses read):

    width    = ceil(22·c / 100)                about 22 % of the smallest class, rounded up (so at least 1)
    stride   = max(1, floor(2·c / 100 + 1/2))  about 2 % of it, rounded half up, at least 1
    mem_thre = the 95th percentile of the scores, interpolated linearly between the two nearest of them (numpy's
               and pandas' default), so that about the top 5 % of the training set is on the risk side

The window's rule is computed in integers: 0.22 * 50 is 11.000000000000002 in floating point, whose ceiling is
12. A percentile lies between the lowest and the highest score, so mem_thre passes the scores' range check.
prune_modi.py resolves each `auto` once per run, from the victim's training set, and the victim and every shadow
prune with those values (mia_modi.py's adaptive attack mimics the victim's defense on the shadows).
"""

import argparse
import math
from collections import Counter

import numpy as np

AUTO = "auto"
WIDTH_PERCENT, STRIDE_PERCENT = 22, 2  # of the smallest class
MEM_QUANTILE = 0.95


def number_or_auto(kind, what):
    """An argparse type: `auto`, or a value of kind (int or float)."""

    def parse(text):
        if text == AUTO:
            return AUTO
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or {AUTO}, got {text!r}")

    return parse


int_or_auto = number_or_auto(int, "an integer")
float_or_auto = number_or_auto(float, "a number")


def auto_window(class_sizes) -> tuple:
    """(stride, width) for classes of these sizes: the rules above on the smallest."""
    c = min(class_sizes)
    return max(1, (STRIDE_PERCENT * c + 50) // 100), -(-WIDTH_PERCENT * c // 100)


def auto_mem_thre(scores) -> float:
    """The MEM_QUANTILE quantile of the scores (linear interpolation), kept inside their range."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(min(max(np.quantile(scores, MEM_QUANTILE), scores.min()), scores.max()))


def derive(flags, labels, scores=None, whose="the victim's training set") -> tuple:
    """({flag: value}, the log line that says how) for the flags (of stride, width, mem_thre) given as auto;
    labels: the training labels of `whose` (the victim's), scores: the whole training set's mem-scores. ({}, None)
    for no flag."""
    values, parts = {}, []
    if "stride" in flags or "width" in flags:
        c = min(Counter(labels.tolist()).values())
        stride, width = auto_window([c])
        rules = {
            "stride": f"stride {stride} = max(1, round({STRIDE_PERCENT / 100:g} x {c}))",
            "width": f"width {width} = ceil({WIDTH_PERCENT / 100:g} x {c})",
        }
        values.update({flag: value for flag, value in (("stride", stride), ("width", width)) if flag in flags})
        parts.append(
            ", ".join(rules[flag] for flag in ("stride", "width") if flag in flags)
            + f" ({c}: the smallest class of {whose})"
        )
    if "mem_thre" in flags:
        values["mem_thre"] = auto_mem_thre(scores)
        percentile = f"{100 * MEM_QUANTILE:g}th percentile"
        parts.append(
            f"mem_thre {values['mem_thre']:g} = the {percentile} of {len(scores)} mem-scores (the training set's)"
        )
    return values, "Auto settings: " + "; ".join(parts) if parts else None


def window_rule(class_sizes, stride, width, prune_epochs):
    """The log line that says what a window means on this data: width as a share of the smallest class
    (rounded to a whole percent) and a full pass, the epochs until the window has reached the end of the
    largest class (1 when the width covers it, else ceil((largest - width) / stride) + 1), next to the
    epochs of a pruning iteration (the window restarts every iteration)."""
    smallest, largest = min(class_sizes), max(class_sizes)
    full_pass = 1 if width >= largest else math.ceil((largest - width) / stride) + 1
    return (
        f"Window: stride {stride}, width {width} = {100 * width / smallest:.0f}% of the smallest class "
        f"({smallest} samples); a full pass in {full_pass} epochs (largest class {largest} samples; "
        f"{prune_epochs} epochs per pruning iteration)"
    )
