"""Bootstrap intervals (intervals.py): time per attack for 1000 resamples of n attacked samples, per accuracy
kind, wall and CPU time (best of 3), and a paired difference; checks that the vectorised intervals equal
a one-resample-at-a-time loop on a small case.

python bench/bench_bootstrap.py [--tiny]
"""

import argparse
import time

import numpy as np

from common_bench import table

from intervals import METRICS, Attacked, bootstrap, paired_difference, resample_indices


def best_times(fn, repeat=3):
    """(smallest wall time, smallest CPU time of this process) of `repeat` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def looped(attacked, resamples, seed):
    """The same resamples, one at a time (each a bootstrap of the picked samples alone, no resampling)."""
    rows = np.concatenate(list(resample_indices(len(attacked.member), resamples, seed)))
    draws = {m: [] for m in METRICS}
    for row in rows:
        one = Attacked(
            attacked.scores[row],
            attacked.member[row],
            attacked.accuracy_kind,
            None if attacked.decisions is None else attacked.decisions[row],
        )
        for m, (value, _, _) in bootstrap(one, resamples=0).items():
            draws[m].append(value)
    out = {}
    for m, values in draws.items():
        values = np.array([v for v in values if np.isfinite(v)])
        out[m] = tuple(np.percentile(values, [2.5, 97.5])) if len(values) else (np.nan, np.nan)
    return out


def example(n, rng):
    member = rng.random(n) < 0.5
    scores = rng.normal(size=n) + 0.3 * member  # continuous: as many distinct scores as samples (worst case)
    return member, scores, scores > 0.1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    resamples = 50 if args.tiny else 1000
    rows = []
    for n in (500,) if args.tiny else (1000, 10000):
        member, scores, said = example(n, rng)
        runs = {
            kind: Attacked(scores, member, kind, said if kind != "best_balanced" else None)
            for kind in ("balanced", "plain", "best_balanced")
        }
        for kind, run in runs.items():
            wall, cpu = best_times(lambda run=run: bootstrap(run, resamples, seed=1))
            rows.append([n, resamples, kind, f"{wall:.3f}", f"{cpu:.3f}"])
        other = Attacked(np.roll(scores, 1), member, "balanced", np.roll(said, 1))
        wall, cpu = best_times(lambda a=other, b=runs["balanced"]: paired_difference(a, b, resamples, seed=1))
        rows.append([n, resamples, "paired (balanced)", f"{wall:.3f}", f"{cpu:.3f}"])
    table("bootstrap per attack", ["samples", "resamples", "accuracy", "wall s", "CPU s"], rows)
    member, scores, said = example(300, rng)
    small = Attacked(np.round(scores, 1), member, "balanced", said)
    fast = bootstrap(small, 40, seed=2)
    slow = looped(small, 40, 2)
    same = all(np.allclose(fast[m][1:], slow[m], rtol=1e-9, atol=1e-12) for m in METRICS)
    print(f"\nvectorised == one resample at a time (300 samples, 40 resamples): {same}")
    assert same, "vectorised bootstrap disagrees with the loop"


if __name__ == "__main__":
    main()
