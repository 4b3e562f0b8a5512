"""auditing/loo_attacks.py: online LiRA and RMIA with IN references (leave one out), the pooled decisions, their metrics
with the cluster bootstrap, and the mem-score decile table, each against a slow literal reference written as
plain loops over targets, samples, references and resamples, plus cases worked out by hand."""

import math
import statistics

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import intervals
from attacks import RMIA_GAMMA, _rankable
from auditing import loo_attacks
from auditing.loo_attacks import audit_metrics, decile_table, lira_online_loo, pool, rmia_loo


def random_population(models, samples, classes=4, seed=0, signal=2.0):
    """(logits, labels, member): each model trains on a random half; members get a higher logit on their label."""
    rng = np.random.default_rng(seed)
    member = rng.random((models, samples)) < 0.5
    labels = rng.integers(0, classes, samples)
    boost = signal * member[..., None] * np.eye(classes)[labels][None]
    return rng.normal(size=(models, samples, classes)) + boost, labels, member


def two_class(t):
    """(M, N, 2) logits [0, t] with label 1 everywhere: phi = log(p_1 / p_0) = t exactly."""
    t = np.asarray(t, dtype=np.float64)
    return np.stack([np.zeros_like(t), t], axis=-1), np.ones(t.shape[1], dtype=np.int64)


# ---------------------------------------------------------------- online LiRA


def literal_phi(logits, labels):
    """log(p_y / (1 - p_y)) = z_y - log sum_{j != y} exp(z_j), per model and sample."""
    models, samples, classes = logits.shape
    return [
        [
            logits[m][n][labels[n]] - math.log(sum(math.exp(logits[m][n][j]) for j in range(classes) if j != labels[n]))
            for n in range(samples)
        ]
        for m in range(models)
    ]


def slow_lira(logits, labels, member, per_sample):
    """Online LiRA written out: for target m and sample n, the IN and OUT values of the other models; variances
    per sample (ddof 1) or pooled over samples (sum of squared deviations / sum of (count - 1)), a single
    reference's sample and a kind without any such sample falling back as the docstrings say; 0 without IN or OUT."""
    phi = literal_phi(logits, labels)
    models, samples = len(phi), len(phi[0])
    scores = np.zeros((models, samples))
    for m in range(models):
        refs = {
            kind: [[phi[k][n] for k in range(models) if k != m and member[k][n] == kind] for n in range(samples)]
            for kind in (True, False)
        }
        ss = {kind: sum(sum((v - statistics.fmean(g)) ** 2 for v in g) for g in refs[kind] if g) for kind in refs}
        dof = {kind: sum(len(g) - 1 for g in refs[kind] if g) for kind in refs}
        pooled = {}
        for kind in refs:
            if dof[kind] > 0:
                pooled[kind] = ss[kind] / dof[kind]
            elif dof[True] + dof[False] > 0:
                pooled[kind] = (ss[True] + ss[False]) / (dof[True] + dof[False])
            else:
                pooled[kind] = statistics.variance([phi[k][n] for k in range(models) if k != m for n in range(samples)])
        for n in range(samples):
            if not refs[True][n] or not refs[False][n]:
                continue  # stays 0
            x = phi[m][n]
            for kind, sign in ((True, 1), (False, -1)):
                group = refs[kind][n]
                var = statistics.variance(group) if per_sample and len(group) >= 2 else pooled[kind]
                var = max(var, 1e-12)
                mean = statistics.fmean(group)
                scores[m, n] += sign * (-0.5 * math.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var))
    return scores


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lira_equals_the_literal_loops(per_sample, seed):
    logits, labels, member = random_population(models=7, samples=40, seed=seed)
    member[:, 0] = True  # no OUT reference for anyone
    member[:, 1] = False  # no IN reference
    member[:, 2] = [True, False, False, False, False, False, True]  # one IN reference for the non-members
    got = lira_online_loo(logits, labels, member, per_sample_var=per_sample)
    np.testing.assert_allclose(got, slow_lira(logits, labels, member, per_sample), rtol=1e-9, atol=1e-9)
    informed = [
        [
            any(member[k][n] for k in range(7) if k != m) and not all(member[k][n] for k in range(7) if k != m)
            for n in range(40)
        ]
        for m in range(7)
    ]
    assert (got[:, :2] == 0).all() and ((got != 0) == np.array(informed)).all()
    torch_input = lira_online_loo(torch.tensor(logits), torch.tensor(labels), torch.tensor(member), per_sample)
    np.testing.assert_array_equal(torch_input, got)


def test_lira_variance_per_sample_from_32_models_on():
    assert loo_attacks.LIRA_ONLINE_PER_SAMPLE_MIN == 32
    logits, labels, member = random_population(models=32, samples=10, seed=3)
    got = lira_online_loo(logits, labels, member)
    np.testing.assert_allclose(got, slow_lira(logits, labels, member, True), rtol=1e-9, atol=1e-9)
    assert not np.allclose(got, lira_online_loo(logits, labels, member, per_sample_var=False))
    fewer = lira_online_loo(logits[:31], labels, member[:31])
    np.testing.assert_array_equal(fewer, lira_online_loo(logits[:31], labels, member[:31], per_sample_var=False))
    np.testing.assert_allclose(fewer, slow_lira(logits[:31], labels, member[:31], False), rtol=1e-9, atol=1e-9)


def test_lira_variance_fallbacks_with_three_models():
    logits, labels, member = random_population(models=3, samples=12, seed=4)
    member[1] = ~member[2]  # target 0: every sample has one IN and one OUT reference, no spread at all
    member[0] = False
    got = lira_online_loo(logits, labels, member)
    np.testing.assert_allclose(got, slow_lira(logits, labels, member, False), rtol=1e-9, atol=1e-9)
    # target 1: no sample has two IN references (only model 2 can be one), so its IN variance is the shared one
    np.testing.assert_allclose(got, slow_lira(logits, labels, member, True), rtol=1e-9, atol=1e-9)


def test_lira_by_hand():
    """One sample, five models with phi 4, 2, 0 (IN) and -1, -3 (OUT)."""
    logits, labels = two_class([[4.0], [2.0], [0.0], [-1.0], [-3.0]])
    member = np.array([[True], [True], [True], [False], [False]])
    got = lira_online_loo(logits, labels, member, per_sample_var=True)[:, 0]
    # target 0: IN {2, 0} mean 1 var 2, OUT {-1, -3} mean -2 var 2: (-(4 - 1)^2 + (4 + 2)^2) / 4
    # target 1: IN {4, 0} mean 2 var 8: -log(8) / 2 + log(2) / 2 + (2 + 2)^2 / 4
    # target 2: IN {4, 2} mean 3 var 2: (-(0 - 3)^2 + (0 + 2)^2) / 4
    # targets 3, 4: IN {4, 2, 0} mean 2 var 4; one OUT reference, whose variance is the IN one (no OUT spread)
    expected = [27 / 4, 4 - math.log(2), -5 / 4, (-9 + 4) / 8, (-25 + 4) / 8]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    pooled = lira_online_loo(logits, labels, member, per_sample_var=False)[:, 0]
    np.testing.assert_allclose(pooled[[0, 2]], expected[0:3:2], rtol=1e-12)  # pooled = per sample on one sample


def test_lira_separates_members_and_rejects_bad_shapes():
    logits, labels, member = random_population(models=8, samples=200, seed=5, signal=4.0)
    scores = lira_online_loo(logits, labels, member)
    assert audit_metrics(scores, member, resamples=0)["AUC"][0] > 0.95
    with pytest.raises(ValueError, match=r"labels \(N,\)"):
        lira_online_loo(logits, labels[:-1], member)
    with pytest.raises(ValueError, match="at least 2 models"):
        lira_online_loo(logits[:1], labels, member[:1])


# ---------------------------------------------------------------- RMIA with IN references


def slow_rmia(logits, labels, member, gamma, population):
    """RMIA online written out: p(x) = mean over the other models of p(y_x | x), ratio = p(y_x | x, target) / p(x),
    score = fraction of the population samples outside the target's training set, x excluded, that x beats."""
    models, samples, classes = logits.shape
    prob = [
        [
            math.exp(logits[m][n][labels[n]]) / sum(math.exp(logits[m][n][j]) for j in range(classes))
            for n in range(samples)
        ]
        for m in range(models)
    ]
    scores = np.zeros((models, samples))
    for m in range(models):

        def ratio(n, m=m):
            return prob[m][n] / (sum(prob[k][n] for k in range(models) if k != m) / (models - 1))

        for x in range(samples):
            zs = [z for z in population if not member[m][z] and z != x]
            scores[m, x] = sum(ratio(x) / ratio(z) > gamma for z in zs) / len(zs)
    return scores


@pytest.mark.parametrize("gamma", [RMIA_GAMMA, 0.5, 2.0])
def test_rmia_equals_the_literal_loops(gamma):
    assert RMIA_GAMMA == 1.0
    logits, labels, member = random_population(models=6, samples=50, seed=6, signal=1.0)
    logits[:, 7], labels[7] = logits[:, 3], labels[3]  # sample 7 = sample 3 on every model: exact ties
    logits[:, 9], labels[9] = logits[:, 3], labels[3]
    got = rmia_loo(logits, labels, member, gamma=gamma)
    np.testing.assert_array_equal(got, slow_rmia(logits, labels, member, gamma, range(50)))
    subset = np.arange(0, 50, 3)
    np.testing.assert_array_equal(
        rmia_loo(logits, labels, member, gamma=gamma, population=subset),
        slow_rmia(logits, labels, member, gamma, subset),
    )
    mask = np.zeros(50, bool)
    mask[subset] = True
    np.testing.assert_array_equal(
        rmia_loo(logits, labels, member, gamma=gamma, population=mask),
        rmia_loo(logits, labels, member, gamma=gamma, population=subset),
    )


def test_rmia_by_hand():
    """Three models, four samples, p(y|x) 0.9 on a member and 0.5 otherwise (model 2: 0.9 on samples 0 and 2)."""
    p = np.array([[0.9, 0.9, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0.9, 0.5, 0.9, 0.5]])
    logits, labels = two_class(np.log(p / (1 - p)))
    member = p > 0.7
    # target 0: p(x) = mean of models 1 and 2 = [0.7, 0.5, 0.9, 0.7], ratio = [9/7, 9/5, 5/9, 5/7]; population:
    # samples 2 and 3; samples 0 and 1 beat both, sample 2 does not beat 3, sample 3 beats 2
    assert list(rmia_loo(logits, labels, member)[0]) == [1.0, 1.0, 0.0, 1.0]
    # gamma 2: of the quotients 9/7 / (5/9) = 2.31, 9/7 / (5/7) = 1.8, 9/5 / (5/9) = 3.24, 9/5 / (5/7) = 2.52,
    # (5/9) / (5/7) = 0.78 and (5/7) / (5/9) = 1.29, those of samples 0 (one of two) and 1 (both) pass
    assert list(rmia_loo(logits, labels, member, gamma=2.0)[0]) == [0.5, 1.0, 0.0, 0.0]


def test_rmia_bisection_counts_the_literal_quotient():
    rng = np.random.default_rng(7)
    for _ in range(50):
        z = np.round(rng.random(int(rng.integers(1, 30))) * 4, 1)  # many ties, some 0
        x = np.concatenate([np.round(rng.random(20) * 4, 1), [0.0, np.inf, np.nan], z[:3]])
        z[rng.random(len(z)) < 0.1] = np.inf
        z[rng.random(len(z)) < 0.1] = np.nan
        gamma = float(rng.choice([1.0, 0.7, 1.5, 3.0]))
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = [sum(xi / zj > gamma for zj in z) for xi in x]
        assert list(loo_attacks._count_beaten(x, np.sort(z), gamma)) == expected


def test_rmia_needs_a_population_per_target():
    logits, labels, member = random_population(models=4, samples=20, seed=8)
    member[2] = np.arange(20) != 19  # model 2 trained on all samples but one
    with pytest.raises(ValueError, match="target model 2 has 1 population samples"):
        rmia_loo(logits, labels, member)
    with pytest.raises(ValueError, match="gamma"):
        rmia_loo(logits, labels, member, gamma=0.0)


# ---------------------------------------------------------------- pooling and metrics


def test_pool_is_model_major():
    scores = np.array([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]])
    member = np.array([[True, False, True], [False, True, False]])
    flat, truth, sample = pool(scores, member, [2, 0])
    assert list(flat) == [2.0, 0.0, 12.0, 10.0] and list(truth) == [True, True, False, False]
    assert list(sample) == [2, 0, 2, 0]
    mask = np.array([True, False, True])
    assert [list(a) for a in pool(scores, member, mask)] == [[0.0, 2.0, 10.0, 12.0], [1, 1, 0, 0], [0, 2, 0, 2]]
    assert len(pool(scores, member)[0]) == 6
    with pytest.raises(ValueError, match="repeat"):
        pool(scores, member, [0, 0])


def literal_metrics(scores, member):
    """AUC and TPR@x (highest TPR in % at an FPR <= x) of a list of decisions, with scikit-learn's ROC."""
    scores, member = np.array(scores), np.array(member, dtype=bool)
    if member.all() or not member.any():
        return {m: np.nan for m in loo_attacks.METRICS}
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    out = {"AUC": roc_auc_score(member, scores)}
    for metric, target in intervals.FPR_TARGETS.items():
        out[metric] = 100 * tpr[fpr <= target].max()
    return out


def literal_draws(samples, resamples, seed):
    """The resamples of sample positions: default_rng(seed), intervals.CHUNK rows of draws per call."""
    rng = np.random.default_rng(seed)
    rows = []
    for start in range(0, resamples, intervals.CHUNK):
        rows.extend(rng.integers(0, samples, (min(intervals.CHUNK, resamples - start), samples)))
    return rows


def slow_audit(scores, member, rows, resamples, seed):
    """{metric: (value, lo, hi)}: every resample of samples lists the decisions of each drawn sample on every target."""
    scores = _rankable(scores)

    def decisions(positions):
        picked = [(scores[m][rows[j]], member[m][rows[j]]) for j in positions for m in range(len(scores))]
        return literal_metrics([s for s, _ in picked], [t for _, t in picked])

    point = decisions(range(len(rows)))
    draws = {metric: [] for metric in loo_attacks.METRICS}
    for drawn in literal_draws(len(rows), resamples, seed):
        for metric, value in decisions(drawn).items():
            draws[metric].append(value)
    out = {}
    for metric, values in draws.items():
        values = [v for v in values if np.isfinite(v)]
        out[metric] = (point[metric], *np.percentile(values, [2.5, 97.5]))
    return out


def example_scores(models=5, samples=60, seed=9):
    """Scores with ties, one nan and one inf, and a random membership."""
    rng = np.random.default_rng(seed)
    member = rng.random((models, samples)) < 0.4
    scores = np.round(rng.normal(size=(models, samples)) + 0.8 * member, 1)
    scores[0, 3], scores[-1, 5] = np.nan, np.inf
    return scores, member


def test_audit_metrics_equal_the_literal_cluster_bootstrap():
    scores, member = example_scores()
    rows = np.array([5, 3] + list(range(10, 50)))
    resamples = intervals.CHUNK + 30  # two chunks of draws
    got = audit_metrics(scores, member, rows, resamples=resamples, seed=4)
    expected = slow_audit(scores, member, rows, resamples, seed=4)
    for metric in loo_attacks.METRICS:
        assert got[metric] == pytest.approx(expected[metric], rel=1e-9, abs=1e-12), metric
    assert got["samples"] == 42 and got["decisions"] == 5 * 42
    assert got["members"] == member[:, rows].sum() and got["nonmembers"] == (~member[:, rows]).sum()
    assert got == audit_metrics(scores, member, rows, resamples=resamples, seed=4)
    assert got["AUC"] != audit_metrics(scores, member, rows, resamples=resamples, seed=5)["AUC"]


def test_audit_metrics_do_not_depend_on_the_step(monkeypatch):
    scores, member = example_scores(seed=10)
    whole = audit_metrics(scores, member, resamples=150, seed=1)
    monkeypatch.setattr(loo_attacks, "BOOTSTRAP_STEP", 7 * scores.size)  # 7 resamples per step
    assert audit_metrics(scores, member, resamples=150, seed=1) == whole


def test_one_model_is_the_ordinary_bootstrap():
    scores, member = example_scores(models=1, samples=80, seed=11)
    got = audit_metrics(scores, member, resamples=120, seed=2)
    plain = intervals.bootstrap(intervals.Attacked(_rankable(scores[0]), member[0]), resamples=120, seed=2)
    assert all(got[m] == plain[m] for m in loo_attacks.METRICS) and got["AUC"][1] < got["AUC"][2]


def test_separable_decisions_and_the_measurable_rule():
    member = np.zeros((10, 200), dtype=bool)
    member[:, :100] = True  # 1,000 member and 1,000 non-member decisions
    got = audit_metrics(member.astype(float), member, resamples=50)
    assert got["AUC"] == (1.0, 1.0, 1.0)
    assert got["TPR@1%FPR"] == got["TPR@0.1%FPR"] == (100.0, 100.0, 100.0)
    assert got["nonmembers"] == 1000 and got["members"] == 1000
    assert got["measurable"] == {"AUC": True, "TPR@1%FPR": True, "TPR@0.1%FPR": False}
    fewer = audit_metrics(member.astype(float), member, rows=np.arange(199), resamples=0)
    assert fewer["nonmembers"] == 990 and not fewer["measurable"]["TPR@1%FPR"]
    assert fewer["TPR@1%FPR"][0] == 100.0 and np.isnan(fewer["TPR@1%FPR"][1])  # value kept; no resamples
    inverted = audit_metrics(-member.astype(float), member, resamples=20)
    assert inverted["AUC"] == (0.0, 0.0, 0.0) and inverted["TPR@1%FPR"] == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- mem-score deciles


def slow_deciles(scores, member, memscore, rows):
    """The decile table written out: rank, cut into ten, one threshold per FPR target from all non-member
    decisions (the lowest candidate score whose FPR is within the target), hits counted per decile."""
    scores = _rankable(scores)
    order = sorted(range(len(rows)), key=lambda j: (memscore[rows[j]], j))
    decile = {j: rank * 10 // len(rows) for rank, j in enumerate(order)}
    everything = [(scores[m][rows[j]], member[m][rows[j]]) for j in range(len(rows)) for m in range(len(scores))]
    negatives = [s for s, t in everything if not t]
    thresholds = {}
    for metric, target in intervals.FPR_TARGETS.items():
        valid = [
            t for t in sorted({s for s, _ in everything}) if sum(s >= t for s in negatives) / len(negatives) <= target
        ]
        thresholds[metric] = min(valid) if valid else np.inf
    table = []
    for d in range(10):
        mine = [j for j in range(len(rows)) if decile[j] == d]
        pairs = [(scores[m][rows[j]], member[m][rows[j]]) for j in mine for m in range(len(scores))]
        pos, neg = [s for s, t in pairs if t], [s for s, t in pairs if not t]
        values = [memscore[rows[j]] for j in mine]
        row = {
            "decile": d + 1,
            "samples": len(mine),
            "memscore_mean": statistics.fmean(values),
            "memscore_min": min(values),
            "memscore_max": max(values),
            "members": len(pos),
            "nonmembers": len(neg),
            "AUC": roc_auc_score([True] * len(pos) + [False] * len(neg), pos + neg) if pos and neg else np.nan,
        }
        for metric, t in thresholds.items():
            row[metric] = 100 * sum(s >= t for s in pos) / len(pos) if pos else np.nan
            row["FPR" + metric[3:]] = 100 * sum(s >= t for s in neg) / len(neg) if neg else np.nan
        table.append(row)
    return table


def test_decile_table_equals_the_literal_loops():
    scores, member = example_scores(models=6, samples=300, seed=12)
    memscore = np.round(np.random.default_rng(13).random(300), 1)  # ties straddle the cuts
    rows = np.random.default_rng(14).permutation(300)[:257]
    got = decile_table(scores, member, memscore, rows)
    expected = slow_deciles(scores, member, memscore, rows)
    assert [list(r) for r in got] == [list(r) for r in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-12, nan_ok=True)
    assert sum(r["samples"] for r in got) == 257 and {r["samples"] for r in got} == {25, 26}
    # the members said member, summed over deciles, are the pooled TPR at that FPR
    pooled = audit_metrics(scores, member, rows, resamples=0)
    for metric in intervals.FPR_TARGETS:
        hits = sum(r[metric] / 100 * r["members"] for r in got)
        assert 100 * hits / pooled["members"] == pytest.approx(pooled[metric][0], rel=1e-12)


def test_decile_table_by_hand():
    """Twenty samples on two models; only the top decile's members stand out."""
    memscore = np.arange(20) / 20.0
    member = np.zeros((2, 20), dtype=bool)
    member[0, ::2] = member[1, 1::2] = True
    scores = np.where(member, 0.5, 0.0)
    scores[:, 18:] = np.where(member[:, 18:], 2.0, 1.0)  # top decile: separable, and its non-members rank high
    table = decile_table(scores, member, memscore)
    top = table[-1]
    assert top["samples"] == 2 and top["members"] == 2 and top["nonmembers"] == 2 and top["AUC"] == 1.0
    assert top["memscore_min"] == 0.9 and top["memscore_max"] == 0.95
    # 20 non-member decisions: the 1% threshold allows no false positive, so only the two scores of 2 pass
    assert top["TPR@1%FPR"] == 100.0 and top["FPR@1%FPR"] == 0.0
    assert all(r["TPR@1%FPR"] == 0.0 and r["AUC"] == 1.0 for r in table[:-1])
    with pytest.raises(ValueError, match="finite"):
        decile_table(scores, member, np.where(memscore > 0.5, np.nan, memscore))


def test_paired_difference_equals_the_literal_paired_bootstrap():
    """Each resample draws the same samples for both stages; the interval is over the per-resample differences."""
    scores, member = example_scores(seed=12)
    base, _ = example_scores(seed=13)
    rows = np.arange(3, 50)
    resamples = 40
    got = loo_attacks.paired_difference(scores, base, member, rows, resamples=resamples, seed=6)

    def decisions(s, positions):
        s = _rankable(s)
        picked = [(s[m][rows[j]], member[m][rows[j]]) for j in positions for m in range(len(s))]
        return literal_metrics([v for v, _ in picked], [t for _, t in picked])

    point, base_point = decisions(scores, range(len(rows))), decisions(base, range(len(rows)))
    diffs = {metric: [] for metric in loo_attacks.METRICS}
    for drawn in literal_draws(len(rows), resamples, 6):
        a, b = decisions(scores, drawn), decisions(base, drawn)
        for metric in loo_attacks.METRICS:
            diffs[metric].append(a[metric] - b[metric])
    for metric in loo_attacks.METRICS:
        values = [v for v in diffs[metric] if np.isfinite(v)]
        expected = (point[metric] - base_point[metric], *np.percentile(values, [2.5, 97.5]))
        assert got[metric] == pytest.approx(expected, rel=1e-9, abs=1e-12), metric
    same = loo_attacks.paired_difference(scores, scores, member, rows, resamples=resamples, seed=6)
    assert all(same[m] == (0.0, 0.0, 0.0) for m in loo_attacks.METRICS)  # a stage against itself: exactly none
