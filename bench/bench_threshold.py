"""Threshold attack: the sorted O(n log n) search (attacks.threshold_accuracy) vs the literal
quadratic rule, 10 classes, n values per class; checks that outputs are identical.

python bench/bench_threshold.py [--tiny]
"""

import argparse
import time

import numpy as np

from common_bench import table

from attacks import threshold_accuracy


def quadratic_threshold(members, nonmembers):
    threshold, best = 0.0, 0.0
    for value in np.concatenate([members, nonmembers]):
        acc = 0.5 * (
            np.sum(members >= value) / (len(members) + 0.0) + np.sum(nonmembers < value) / (len(nonmembers) + 0.0)
        )
        if acc > best:
            threshold, best = value, acc
    return threshold


def quadratic_accuracy(sv, sg, sm, vv, vg, vm, groups):
    thresholds = np.array([quadratic_threshold(sv[(sg == g) & sm], sv[(sg == g) & ~sm]) for g in range(groups)])
    said = vv >= thresholds[vg]
    return 100 * 0.5 * (said[vm].mean() + (~said[~vm]).mean())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for per_class in (50, 200) if args.tiny else (1000, 5000, 20000):
        n = 10 * per_class
        # rounded values so that ties are common, as with saturated softmax outputs
        sv, vv = (np.round(rng.random(n) ** 3, 3) for _ in range(2))
        sg, vg = (np.repeat(np.arange(10), per_class) for _ in range(2))
        sm, vm = (rng.random(n) < 0.5 for _ in range(2))
        start = time.perf_counter()
        fast = threshold_accuracy(sv, sg, sm, vv, vg, vm, 10)
        t_fast = time.perf_counter() - start
        start = time.perf_counter()
        slow = quadratic_accuracy(sv, sg, sm, vv, vg, vm, 10)
        t_slow = time.perf_counter() - start
        rows.append([per_class, f"{t_fast:.4f}", f"{t_slow:.3f}", f"{t_slow / t_fast:.0f}", fast == slow])
    table("threshold search, 10 classes", ["per class", "sorted s", "quadratic s", "speed-up", "identical"], rows)
    assert all(r[-1] for r in rows), "sorted search disagrees with the quadratic rule"


if __name__ == "__main__":
    main()
