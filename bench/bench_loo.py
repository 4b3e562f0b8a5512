"""Leave-one-out online attacks (auditing/loo_attacks.py) on M = 64 models: wall time and peak traced memory (numpy's
allocations, tracemalloc) of online LiRA, RMIA, audit_metrics' cluster bootstrap and the decile table, for
N = 2,000 and N = 60,000 samples; checks RMIA's bisection against attacks.rmia_pairwise's quadratic count.

python bench/bench_loo.py [--tiny] [--resamples 1000]
"""

import argparse
import time
import tracemalloc

import numpy as np
import torch

from common_bench import table

from attacks import rmia_pairwise, rmia_ratio, true_label_prob
from auditing.loo_attacks import audit_metrics, decile_table, lira_online_loo, rmia_loo


def population(models, samples, classes, rng):
    """Every model trains on exactly half of the samples; members get a higher logit on their label."""
    member = np.zeros((models, samples), dtype=bool)
    for m in range(models):
        member[m, rng.permutation(samples)[: samples // 2]] = True
    labels = rng.integers(0, classes, samples)
    logits = rng.standard_normal((models, samples, classes), dtype=np.float32)
    logits[member, labels[np.nonzero(member)[1]]] += 3.0
    return torch.from_numpy(logits), labels, member


def measured(fn, *args):
    """(fn(*args), wall seconds, peak MiB traced while it ran)."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, wall, peak


def quadratic_rmia(logits, labels, member, target):
    """Target's RMIA scores from attacks.rmia_ratio (a = 1, every other model) and rmia_pairwise, x left out of Z."""
    prob = np.stack([true_label_prob(z, torch.as_tensor(labels)).numpy() for z in logits])
    others = np.arange(len(prob)) != target
    ratio = rmia_ratio(prob[target], prob[others], np.ones((len(prob) - 1, prob.shape[1]), bool), 1.0)
    z = ~member[target]
    beaten = np.rint(rmia_pairwise(ratio, ratio[z], 1.0) * z.sum())  # the fraction back to a count
    count = beaten - (z & (ratio / ratio > 1.0))
    return count / (z.sum() - z)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    models, canaries = (8, 50) if args.tiny else (64, 500)
    resamples = 20 if args.tiny else args.resamples
    rows = []
    for samples in (300,) if args.tiny else (2000, 60000):
        logits, labels, member = population(models, samples, 10, rng)
        lira, wall, peak = measured(lira_online_loo, logits, labels, member)
        rows.append([models, samples, "lira_online_loo", "-", f"{wall:.2f}", f"{peak:.0f}"])
        rmia, wall, peak = measured(rmia_loo, logits, labels, member)
        rows.append([models, samples, "rmia_loo", "-", f"{wall:.2f}", f"{peak:.0f}"])
        for name, subset in ((f"audit_metrics {canaries} samples", np.arange(canaries)), ("audit_metrics all", None)):
            _, wall, peak = measured(audit_metrics, lira, member, subset, resamples)
            rows.append([models, samples, name, resamples, f"{wall:.2f}", f"{peak:.0f}"])
        _, wall, peak = measured(decile_table, lira, member, rng.random(samples))
        rows.append([models, samples, "decile_table", "-", f"{wall:.2f}", f"{peak:.0f}"])
        if samples <= 2000:
            same = np.array_equal(rmia[0], quadratic_rmia(logits, labels, member, 0))
    table("leave-one-out attacks", ["models", "samples", "step", "resamples", "wall s", "peak MiB"], rows)
    print(f"\nrmia_loo == rmia_pairwise's quadratic count (target 0): {same}")
    assert same, "RMIA's bisection disagrees with the quadratic count"


if __name__ == "__main__":
    main()
