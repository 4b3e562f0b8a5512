"""Leave-one-out online membership attacks over a population of M models (online LiRA, RMIA with IN
references), the pooling of their decisions, and the audit metrics on them (docs/attacks.md).

Every model trained on its own subset of the same N samples. Inputs, as numpy arrays or torch tensors:
  logits  (M, N, C)  model m's logits on sample n
  labels  (N,)       the label each sample was TRAINED with (a canary's wrong label)
  member  (M, N)     bool: sample n was in model m's training set
A score array is (M, N): score[m, n] attacks target model m on sample n with the other M - 1 models as its
references (leave one out), higher = more likely a member. A decision is one (target m, sample n) pair;
pool() lists the M x len(rows) decisions of a set of samples, model-major: decision m * len(rows) + j is
(m, rows[j]). The metrics are those of the attack logs (intervals.py): AUC (ties count a half), TPR@x =
the highest TPR in percent among ROC points with FPR <= x, and a TPR is not measurable when x times the
number of non-member decisions is below 10 (intervals.measurable); as in results.csv, its value is kept
and the count of non-member decisions says so.
"""

import math

import numpy as np
import torch

from attacks import RMIA_GAMMA, _rankable, logit_confidence, rmia_ratio, true_label_prob
from intervals import FPR_TARGETS, LEVEL, RESAMPLES, Attacked, Sorted, measurable, percentile_interval, resample_indices

LIRA_ONLINE_PER_SAMPLE_MIN = 32  # models (target included) from which each sample gets its own variances
# Models (target included) from which an attack's score can say anything: LiRA needs an IN and an OUT reference
# among the other M - 1 models, so M - 1 >= 2; RMIA's p_m(x) needs one other model.
LIRA_MIN_MODELS, RMIA_MIN_MODELS = 3, 2
VAR_FLOOR = 1e-12  # smallest variance of a Gaussian, as in attacks.lira_scores
METRICS = ("AUC",) + tuple(FPR_TARGETS)  # audit_metrics' metrics, in report order
BOOTSTRAP_STEP = 1 << 21  # decisions x resamples per vectorised bootstrap step (bounds the memory)
DECILES = 10


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _checked_member(logits, labels, member) -> np.ndarray:
    """member as a bool (M, N) array, after checking the three inputs' shapes agree."""
    member, shape = _numpy(member), _shape(logits)
    if len(shape) != 3 or member.shape != shape[:2] or _shape(labels) != shape[1:2]:
        raise ValueError(
            f"logits must be (M, N, C), labels (N,) and member (M, N); got {shape}, {_shape(labels)} and {member.shape}"
        )
    if shape[0] < 2:
        raise ValueError(f"leave-one-out attacks need at least 2 models, got {shape[0]}")
    return member.astype(bool)


def _per_model(signal, logits, labels) -> np.ndarray:
    """(M, N) float64: signal(logits[m], labels) of every model m, one model at a time (bounded memory)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, device=logits.device).long()
    return np.stack([signal(z, labels).double().cpu().numpy() for z in logits])


def _rows(rows, n: int) -> np.ndarray:
    """Sample indices: all n for None, the True positions of a bool mask, else the distinct indices given."""
    if rows is None:
        return np.arange(n)
    rows = _numpy(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ValueError(f"a bool rows mask must have one entry per sample ({n}), got {rows.shape}")
        return np.flatnonzero(rows)
    rows = rows.astype(np.int64).ravel()
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"rows must be sample indices in [0, {n}), got {rows.min()}..{rows.max()}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows must not repeat a sample: each sample's decisions are pooled once")
    return rows


# ---------------------------------------------------------------- online LiRA


def _loo_moments(phi, kind) -> tuple:
    """(count, mean, ss), each (M, N), of phi over the references of one kind of target m on sample n, i.e. over
    {k != m : kind[k, n]} (kind: member for the IN references, ~member for the OUT ones): their number c, their
    mean (nan when c = 0) and their sum of squared deviations from it (0 when c = 0). Computed from sums over
    all M models minus the target's own term, after centring each sample on its kind's mean over all M models
    (so the sum of squares does not cancel), in O(M N)."""
    w = kind.astype(np.float64)
    total = w.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.where(total > 0, np.where(kind, phi, 0.0).sum(0) / total, 0.0)
        d = np.where(kind, phi - centre, 0.0)
        count = total - w
        s = d.sum(0) - d
        q = (d * d).sum(0) - d * d
        mean_d = s / count
        ss = np.where(count > 0, np.maximum(q - s * mean_d, 0.0), 0.0)
    return count, centre + mean_d, ss


def _pooled_variances(phi, moments_in, moments_out) -> tuple:
    """(var_in, var_out), each (M,): target m's pooled variances. For a kind with sums of squares SS[m, n]
    over c[m, n] references, var = sum_n SS[m, n] / sum_n max(c - 1, 0): every sample's spread around its own
    mean, the unbiased pooled estimate (a sample with one reference adds nothing). When no sample has two
    references of that kind, the same pooled over both kinds (one variance for IN and OUT); when no sample has
    two references of either kind (M <= 3), the variance (ddof 1) of all references' phi over samples, as
    attacks.lira_scores does with one shadow."""
    dofs = [np.maximum(c - 1, 0).sum(1) for c, _, _ in (moments_in, moments_out)]
    sums = [ss.sum(1) for _, _, ss in (moments_in, moments_out)]
    shared = np.empty(len(phi))
    for m in range(len(phi)):
        if dofs[0][m] + dofs[1][m] > 0:
            shared[m] = (sums[0][m] + sums[1][m]) / (dofs[0][m] + dofs[1][m])
        else:
            references = np.delete(phi, m, axis=0)
            shared[m] = references.var(ddof=1) if references.size > 1 else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return tuple(np.where(dof > 0, total / dof, shared) for total, dof in zip(sums, dofs))


def _variances(moments, pooled, per_sample: bool) -> np.ndarray:
    """(M, N): SS / (c - 1) where per_sample and c >= 2, else the target's pooled variance; at least VAR_FLOOR."""
    count, _, ss = moments
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(per_sample & (count >= 2), ss / (count - 1), pooled[:, None])
    return np.maximum(var, VAR_FLOOR)


def _log_normal(x, mean, var):
    return -0.5 * np.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var)


def lira_online_loo(logits, labels, member, per_sample_var: bool = None) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022), leave one out: (M, N) scores.

    phi[k, n] = log(p_y / (1 - p_y)) of model k on sample n (attacks.logit_confidence). For target m the IN
    references of sample n are the models k != m that trained on it, the OUT references the models k != m that
    did not; score[m, n] = log N(phi[m, n]; mu_in, var_in) - log N(phi[m, n]; mu_out, var_out), with the means
    over those references (per sample) and their variances (ddof 1) per sample when per_sample_var (default:
    M >= LIRA_ONLINE_PER_SAMPLE_MIN), else one pooled IN and one pooled OUT variance per target
    (_pooled_variances); a sample with a single reference of a kind also gets the pooled variance, and no
    variance is below VAR_FLOOR. A sample without an IN or without an OUT reference gets 0, the score of a
    likelihood ratio of 1: the references say nothing about it (with M models each trained on a random half of
    the samples, this happens with probability about 2 ** -(M - 2) per decision).
    """
    member = _checked_member(logits, labels, member)
    phi = _per_model(logit_confidence, logits, labels)
    per_sample = len(phi) >= LIRA_ONLINE_PER_SAMPLE_MIN if per_sample_var is None else bool(per_sample_var)
    moments_in, moments_out = _loo_moments(phi, member), _loo_moments(phi, ~member)
    pooled_in, pooled_out = _pooled_variances(phi, moments_in, moments_out)
    var_in, var_out = _variances(moments_in, pooled_in, per_sample), _variances(moments_out, pooled_out, per_sample)
    with np.errstate(invalid="ignore"):
        ratio = _log_normal(phi, moments_in[1], var_in) - _log_normal(phi, moments_out[1], var_out)
    return np.where((moments_in[0] > 0) & (moments_out[0] > 0), ratio, 0.0)


def unscored_pairs(member) -> int:
    """How many (target m, sample n) pairs have no IN or no OUT reference among the other M - 1 models: the
    pairs that lira_online_loo scores 0 whatever the models do. member (M, N) bool."""
    member = _numpy(member).astype(bool)
    ins = member.sum(0) - member  # IN references of target m on sample n
    outs = (~member).sum(0) - ~member
    return int(((ins == 0) | (outs == 0)).sum())


# ---------------------------------------------------------------- RMIA with IN references


def _count_beaten(ratio_x, ratio_z_sorted, gamma) -> np.ndarray:
    """For every x, how many z satisfy ratio_x / ratio_z > gamma, with the quotient computed as written (as
    attacks.rmia_pairwise). For ratio_x >= 0 the quotient never grows with ratio_z (division is correctly
    rounded, hence monotone; 0 / 0 and nan are never > gamma, and nan sorts last), so those z are a prefix of
    the ascending ratio_z, whose length a bisection on the quotient itself finds: O(len(x) log len(z))."""
    lo = np.zeros(len(ratio_x), dtype=np.int64)
    hi = np.full(len(ratio_x), len(ratio_z_sorted), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        while (open_ := lo < hi).any():
            mid = (lo + hi) // 2
            beaten = ratio_x / ratio_z_sorted[np.minimum(mid, len(ratio_z_sorted) - 1)] > gamma
            lo = np.where(open_ & beaten, mid + 1, lo)
            hi = np.where(open_ & ~beaten, mid, hi)
    return lo


def rmia_loo(logits, labels, member, gamma: float = RMIA_GAMMA, population=None) -> np.ndarray:
    """RMIA (Zarifzadeh et al. 2024) online, with IN references, leave one out: (M, N) scores.

    p[k, x] = model k's softmax probability of x's label (attacks.true_label_prob). For target m, p_m(x) = the
    mean of p[k, x] over all models k != m, IN and OUT alike (so no offline `a`: attacks.rmia_ratio with a = 1
    and every other model counted), and ratio_m(x) = p[m, x] / p_m(x). The population Z_m is the samples of
    `population` (a bool mask or indices; default: all samples) that target m did not train on, and
    score[m, x] = the fraction of z in Z_m without x itself with ratio_m(x) / ratio_m(z) > gamma (the quotient
    as written, so a tie never counts for gamma 1); nan where ratio_m(x) is nan, as offline. Every target
    needs at least 2 population samples. Memory O(M N), time O(M^2 N + M N log N).
    """
    member = _checked_member(logits, labels, member)
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    prob = _per_model(true_label_prob, logits, labels)
    models, n = prob.shape
    in_population = np.zeros(n, dtype=bool)
    in_population[_rows(population, n)] = True
    others = np.ones((models, n), dtype=bool)
    scores = np.empty((models, n))
    for m in range(models):
        z = in_population & ~member[m]
        if z.sum() < 2:
            raise ValueError(
                f"RMIA: target model {m} has {z.sum()} population samples outside its training set; it needs "
                "at least 2 (pass a larger population, or give each model fewer of the samples)"
            )
        others[m] = False
        ratio = rmia_ratio(prob[m], prob, others, 1.0)
        others[m] = True
        beaten = _count_beaten(ratio, np.sort(ratio[z]), gamma)
        with np.errstate(invalid="ignore", divide="ignore"):
            self_beaten = z & (ratio / ratio > gamma)  # x is its own z when in Z_m: take it out
            scores[m] = np.where(np.isnan(ratio), np.nan, (beaten - self_beaten) / (z.sum() - z))
    return scores


# ---------------------------------------------------------------- pooled decisions and their metrics


def pool(scores, member, rows=None) -> tuple:
    """(scores_flat, member_flat, sample_flat): the M x len(rows) decisions on the samples `rows` (indices, a
    bool mask, or None for all), model-major: entry m * len(rows) + j is target m on sample rows[j], with
    its score, its truth member[m, rows[j]], and its sample index rows[j]."""
    scores, member = _numpy(scores), _numpy(member).astype(bool)
    if scores.shape != member.shape or scores.ndim != 2:
        raise ValueError(f"scores and member must both be (M, N), got {scores.shape} and {member.shape}")
    rows = _rows(rows, scores.shape[1])
    return scores[:, rows].ravel(), member[:, rows].ravel(), np.tile(rows, len(scores))


def audit_metrics(scores, member, rows=None, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """The pooled decisions' metrics with cluster-bootstrap intervals.

    Returns {metric: (value, lower, upper)} for METRICS (AUC, TPR@1%FPR, TPR@0.1%FPR; TPRs in percent) over
    the M x len(rows) decisions of pool(); scores that are nan or infinite rank as attacks._rankable ranks
    them. A resample draws len(rows) of the samples with replacement (intervals.resample_indices(len(rows),
    resamples, seed): the same draws as intervals.bootstrap of that many samples) and every drawn sample brings
    all its M decisions (a cluster bootstrap: a sample's decisions on different targets are not independent);
    the interval is the percentile interval at `level` over the resamples that hold both kinds of decision.
    Also in the dict: "samples", "decisions", "members" and "nonmembers" (counts of decisions), and
    "measurable": {metric: intervals.measurable(metric, non-member decisions)}; a TPR that is not measurable
    keeps its value, as in results.csv.
    """
    flat_member, point, draws = _metric_draws(scores, member, rows, resamples, seed)
    samples = len(flat_member) // len(_numpy(scores))
    nonmembers = int((~flat_member).sum())
    out = {metric: (float(point[metric][0]), *percentile_interval(draws[metric], level)) for metric in METRICS}
    out.update(
        samples=samples,
        decisions=len(flat_member),
        members=len(flat_member) - nonmembers,
        nonmembers=nonmembers,
        measurable={metric: measurable(metric, nonmembers) for metric in METRICS},
    )
    return out


def _metric_draws(scores, member, rows, resamples: int, seed: int) -> tuple:
    """(pooled truths, point metrics, {metric: [per-resample value arrays]}) of audit_metrics' cluster bootstrap."""
    flat_scores, flat_member, _ = pool(scores, member, rows)
    models = len(_numpy(scores))
    samples = len(flat_member) // models
    if samples == 0:
        raise ValueError("audit_metrics needs at least one sample in rows")
    decisions = Sorted(Attacked(_rankable(flat_scores), flat_member))
    point = decisions.metrics(decisions.all_samples())
    draws = {metric: [] for metric in METRICS}
    step = max(1, BOOTSTRAP_STEP // len(flat_member))
    to_decisions = samples * np.arange(models)[None, :, None]  # drawn position j -> its decisions m * S + j
    for drawn in resample_indices(samples, resamples, seed):
        for start in range(0, len(drawn), step):
            part = (drawn[start : start + step, None, :] + to_decisions).reshape(-1, models * samples)
            values = decisions.metrics(part)
            for metric in METRICS:
                draws[metric].append(values[metric])
    return flat_member, point, draws


def paired_difference(
    scores, base_scores, member, rows=None, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict:
    """{metric: (difference, lower, upper)}: a stage's pooled metric minus another's (Base's) on the same
    decisions, the M models of both trained on the same halves (one membership matrix), with a PAIRED cluster
    bootstrap: each resample draws the same samples for both stages (audit_metrics' draws, one seed), so the
    interval is that of the difference itself, narrower than two unpaired intervals when the stages' errors
    move together; resamples where either metric is undefined are left out."""
    _, point, draws = _metric_draws(scores, member, rows, resamples, seed)
    _, base_point, base_draws = _metric_draws(base_scores, member, rows, resamples, seed)
    out = {}
    for metric in METRICS:
        diff = [a - b for a, b in zip(draws[metric], base_draws[metric])]
        value = float(point[metric][0]) - float(base_point[metric][0])
        out[metric] = (value, *percentile_interval(diff, level))
    return out


def _fpr_cut(nonmember_scores, target: float) -> float:
    """The cut c of the threshold at FPR `target`: a decision says member when its score is > c, where c is the
    highest non-member score s with (non-members >= s) / non-members > target (-inf when none). The members
    above c are exactly the TPR@target of the ROC (the highest TPR at an FPR <= target)."""
    values, counts = np.unique(nonmember_scores, return_counts=True)
    false_positives = np.cumsum(counts[::-1])  # at each distinct value, highest first
    over = false_positives / len(nonmember_scores) > target
    return float(values[::-1][over][0]) if over.any() else -np.inf


def _percent_above(values, cut) -> float:
    """Percent of values > cut; nan for no values or no cut (nan: there was no non-member decision)."""
    return 100 * float((values > cut).mean()) if len(values) and not np.isnan(cut) else np.nan


def decile_table(scores, member, memscore, rows=None) -> list:
    """The mechanism table: one dict per mem-score decile of the samples `rows` (default all), lowest first.

    The samples are ranked by memscore (an (N,) array, finite on rows; ties in the order of rows) and cut into
    DECILES groups of equal size (sizes differ by at most one; tied mem-scores may straddle a cut, the min and
    max columns show it). Keys: decile (1 = lowest mem-score), samples, memscore_mean, memscore_min,
    memscore_max, members and nonmembers (pooled decisions of the decile's samples on all M targets), AUC of
    those decisions (nan without both kinds), and for each FPR target, e.g. 1 %: TPR@1%FPR and FPR@1%FPR,
    the decile's member and non-member decisions said member, in percent, at ONE threshold fixed on all
    pooled non-member decisions of rows so that the overall FPR is <= 1 % (the ROC's TPR@1%FPR threshold,
    _fpr_cut). A fixed threshold makes deciles comparable (a per-decile threshold would hand each decile its
    own 1 % of false positives) and shows where the false positives fall; the members' hits summed over the
    deciles give audit_metrics' TPR, so it is measurable exactly when audit_metrics' is. Scores rank as in
    audit_metrics."""
    flat_scores, flat_member, _ = pool(scores, member, rows)
    n = _numpy(scores).shape[1]
    rows = _rows(rows, n)
    memscore = _numpy(memscore).astype(np.float64)
    if memscore.shape != (n,):
        raise ValueError(f"memscore must have one value per sample ({n}), got {memscore.shape}")
    ranked = memscore[rows]
    if not np.isfinite(ranked).all():
        raise ValueError("memscore must be finite on every sample of rows (leave samples without one out of rows)")
    decile = np.empty(len(rows), dtype=np.int64)
    decile[np.argsort(ranked, kind="stable")] = np.arange(len(rows)) * DECILES // max(1, len(rows))
    flat_scores, flat_decile = _rankable(flat_scores), np.tile(decile, len(_numpy(scores)))
    nonmember_scores = flat_scores[~flat_member]
    cuts = {m: _fpr_cut(nonmember_scores, t) if len(nonmember_scores) else np.nan for m, t in FPR_TARGETS.items()}
    table = []
    for d in range(DECILES):
        mine, values = decile == d, flat_scores[flat_decile == d]
        truth = flat_member[flat_decile == d]
        row = {
            "decile": d + 1,
            "samples": int(mine.sum()),
            "memscore_mean": float(ranked[mine].mean()) if mine.any() else np.nan,
            "memscore_min": float(ranked[mine].min()) if mine.any() else np.nan,
            "memscore_max": float(ranked[mine].max()) if mine.any() else np.nan,
            "members": int(truth.sum()),
            "nonmembers": int((~truth).sum()),
        }
        if truth.any() and not truth.all():
            both = Sorted(Attacked(values, truth))
            row["AUC"] = float(both.metrics(both.all_samples())["AUC"][0])
        else:
            row["AUC"] = np.nan
        for metric, cut in cuts.items():
            row[metric] = _percent_above(values[truth], cut)
            row["FPR" + metric[3:]] = _percent_above(values[~truth], cut)
        table.append(row)
    return table
