"""95 % bootstrap intervals of the attack metrics over the attacked samples, and paired intervals of a
defense's difference from Base (docs/results.md).

A resample draws n of the n attacked samples with replacement (the resamples come
from default_rng(seed), CHUNK at a time: resample_indices). Every metric of every resample is computed from
the per-sample counts of that resample, sorted once by score, so 1000 resamples of 10,000 samples take a
fraction of a second; the metrics are exactly those of the log lines: AUC, TPR@x = the highest TPR among
ROC points with FPR <= x, and the attack's own accuracy (ACCURACY_KINDS).
"""

from dataclasses import dataclass

import numpy as np

RESAMPLES, LEVEL = 1000, 0.95
FPR_TARGETS = {"TPR@1%FPR": 0.01, "TPR@0.1%FPR": 0.001}
METRICS = ("accuracy", "AUC") + tuple(FPR_TARGETS)
ACCURACY_KINDS = {  # how an attack's logged accuracy is computed from its per-sample data
    "balanced": "0.5 * (TPR + TNR) of the attack's member decisions (thresholds fitted on the shadows)",
    "plain": "fraction of samples whose member decision is right (NN attacks)",
    "best_balanced": "best 0.5 * (TPR + TNR) over thresholds on the victim's own scores (LiRA)",
}
CHUNK = 100  # resamples per vectorised step: CHUNK x n arrays


@dataclass
class Attacked:
    """One attack's per-sample data on the attacked samples."""

    scores: np.ndarray  # member score, higher = member, finite (attacks._rankable)
    member: np.ndarray  # ground truth
    accuracy_kind: str = None  # a key of ACCURACY_KINDS, or None: no accuracy interval
    decisions: np.ndarray = None  # member decisions (kinds "balanced" and "plain")


def measurable(metric: str, nonmembers: int) -> bool:
    """TPR at an FPR below 10 / nonmembers rests on fewer than ten false positives: not measurable."""
    return metric not in FPR_TARGETS or FPR_TARGETS[metric] * nonmembers >= 10


def resample_indices(n: int, resamples: int, seed: int):
    """Yields (chunk of resamples, n) index arrays, each chunk one rng.integers(0, n, (chunk, n)) call."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        yield rng.integers(0, n, (min(CHUNK, resamples - start), n))


def per_resample_counts(codes: np.ndarray, indices: np.ndarray, size: int) -> np.ndarray:
    """(b, size): how many of each resample's drawn samples carry each code (codes: one int < size per sample)."""
    b = len(indices)
    flat = (codes[indices] + size * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * size).reshape(b, size)


class Sorted:
    """An attack's samples as groups of tied scores, highest score first, so that a resample is counts per
    group (and, for the accuracy, counts per decision and truth)."""

    def __init__(self, attacked: Attacked):
        self.attacked = attacked
        scores = np.asarray(attacked.scores, dtype=np.float64)
        self.member = np.asarray(attacked.member, dtype=bool)
        distinct, group = np.unique(-scores, return_inverse=True)  # group 0: the highest score
        self.groups = len(distinct)
        self.cell = 2 * group.ravel() + self.member  # (group, member) of every sample
        said = np.zeros(len(scores), bool) if attacked.decisions is None else np.asarray(attacked.decisions, bool)
        self.outcome = 2 * said + self.member  # (decision, member) of every sample

    def all_samples(self) -> np.ndarray:
        return np.arange(len(self.member))[None, :]

    def metrics(self, indices: np.ndarray) -> dict:
        """{metric: (b,) values} of the resamples (b, n) of sample indices; nan where one lacks a class."""
        cells = per_resample_counts(self.cell, indices, 2 * self.groups).reshape(len(indices), self.groups, 2)
        neg, pos = cells[..., 0], cells[..., 1]
        tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
        n_pos, n_neg = tp[:, -1:], fp[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr, fpr = tp / n_pos, fp / n_neg
            out = {"AUC": ((pos * (n_neg - fp + 0.5 * neg)).sum(1) / (n_pos * n_neg)[:, 0])}
            for metric, target in FPR_TARGETS.items():  # the (0, 0) point counts: at least 0
                out[metric] = 100 * np.where(fpr <= target, tpr, 0).max(1)
            out["accuracy"] = self.accuracy(indices, tpr, fpr)
        bad = (n_pos[:, 0] == 0) | (n_neg[:, 0] == 0)
        return {m: np.where(bad, np.nan, v) for m, v in out.items()}

    def accuracy(self, indices, tpr, fpr):
        kind = self.attacked.accuracy_kind
        if kind == "best_balanced":
            return 100 * np.maximum((0.5 * (tpr + 1 - fpr)).max(1), 0.5)  # the (0, 0) point: 0.5
        if kind not in ("balanced", "plain"):
            return np.full(len(indices), np.nan)
        # counts of (said non-member, non-member), (said non-member, member), (said member, non-member), ...
        c = per_resample_counts(self.outcome, indices, 4)
        if kind == "plain":
            return 100 * (c[:, 0] + c[:, 3]) / c.sum(1)
        return 100 * 0.5 * (c[:, 3] / (c[:, 1] + c[:, 3]) + c[:, 0] / (c[:, 0] + c[:, 2]))


def percentile_interval(draws: list, level: float = LEVEL) -> tuple:
    """The (lower, upper) percentile interval of the finite values in a list of arrays; (nan, nan) if none."""
    values = np.concatenate(draws) if draws else np.zeros(0)
    values = values[np.isfinite(values)]
    if not len(values):
        return (np.nan, np.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(attacked: Attacked, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """{metric: (value on all samples, lower, upper)}."""
    s = Sorted(attacked)
    point = {m: float(v[0]) for m, v in s.metrics(s.all_samples()).items()}
    draws = {m: [] for m in METRICS}
    for indices in resample_indices(len(s.member), resamples, seed):
        for m, v in s.metrics(indices).items():
            draws[m].append(v)
    return {m: (point[m], *percentile_interval(draws[m], level)) for m in METRICS}


def paired_difference(
    defense: Attacked, base: Attacked, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict:
    """{metric: (defense - base on all samples, lower, upper)}: both runs resampled with the same draws of
    the same samples (same order, same ground truth)."""
    if not np.array_equal(np.asarray(defense.member, bool), np.asarray(base.member, bool)):
        raise ValueError("paired runs must hold the same samples in the same order")
    a, b = Sorted(defense), Sorted(base)
    point_a, point_b = a.metrics(a.all_samples()), b.metrics(b.all_samples())
    draws = {m: [] for m in METRICS}
    for indices in resample_indices(len(a.member), resamples, seed):
        ma, mb = a.metrics(indices), b.metrics(indices)
        for m in METRICS:
            draws[m].append(ma[m] - mb[m])
    return {m: (float(point_a[m][0] - point_b[m][0]), *percentile_interval(draws[m], level)) for m in METRICS}


# ---------------------------------------------------------------- scores files


def read_attacked(path: str, rankable) -> tuple:
    """(sample index, {attack: Attacked}) of a scores file; files written before decisions were saved
    give no accuracy kind (no accuracy interval). `rankable` maps raw scores to finite ones."""
    with np.load(path, allow_pickle=False) as z:
        member = z["member"].astype(bool)
        names = [str(a) for a in z["attacks"]]
        kinds = [str(k) for k in z["accuracy_kind"]] if "accuracy_kind" in z.files else [""] * len(names)
        out = {}
        for name, kind in zip(names, kinds):
            decisions = z[f"decision_{name}"].astype(bool) if f"decision_{name}" in z.files else None
            kind = kind if kind in ACCURACY_KINDS and (decisions is not None or kind == "best_balanced") else None
            out[name] = Attacked(rankable(z[f"score_{name}"]), member, kind, decisions)
        return z["index"].astype(np.int64), out


def align(index_a: np.ndarray, a: Attacked, index_b: np.ndarray, b: Attacked) -> tuple:
    """b's samples in a's order, or None when the two runs did not attack the same samples."""
    if len(index_a) != len(index_b) or not np.array_equal(np.sort(index_a), np.sort(index_b)):
        return None
    where = np.argsort(index_b)[np.searchsorted(np.sort(index_b), index_a)]
    pick = lambda x: None if x is None else np.asarray(x)[where]
    return a, Attacked(pick(b.scores), pick(b.member), b.accuracy_kind, pick(b.decisions))
