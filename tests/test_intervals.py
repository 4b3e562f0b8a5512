"""Bootstrap intervals and paired differences against a slow literal reference (one resample at a time,
scikit-learn's ROC, the accuracies written out), and the scores files they read."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

import intervals
from attacks import _rankable
from intervals import Attacked, align, bootstrap, measurable, paired_difference, read_attacked


def literal_metrics(scores, member, kind, decisions):
    """One sample's metrics, written out as the log lines compute them."""
    if member.all() or not member.any():
        return {m: np.nan for m in intervals.METRICS}
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    out = {
        "AUC": roc_auc_score(member, scores),
        "TPR@1%FPR": 100 * tpr[fpr <= 0.01].max(),
        "TPR@0.1%FPR": 100 * tpr[fpr <= 0.001].max(),
    }
    if kind == "best_balanced":
        out["accuracy"] = 100 * max(0.5 * (t + 1 - f) for t, f in zip(tpr, fpr))
    elif kind == "plain":
        out["accuracy"] = 100 * sum(d == m for d, m in zip(decisions, member)) / len(member)
    elif kind == "balanced":
        hits = [d for d, m in zip(decisions, member) if m]
        rejections = [not d for d, m in zip(decisions, member) if not m]
        out["accuracy"] = 100 * 0.5 * (sum(hits) / len(hits) + sum(rejections) / len(rejections))
    else:
        out["accuracy"] = np.nan
    return out


def literal_draws(attacked_runs, resamples, seed):
    """Per run, per metric, the list of every resample's value, one resample after another."""
    rows = np.concatenate(list(intervals.resample_indices(len(attacked_runs[0].member), resamples, seed)))
    draws = [{m: [] for m in intervals.METRICS} for _ in attacked_runs]
    for row in rows:
        for run, out in zip(attacked_runs, draws):
            d = None if run.decisions is None else run.decisions[row]
            for m, v in literal_metrics(run.scores[row], run.member[row], run.accuracy_kind, d).items():
                out[m].append(v)
    return draws


def literal_interval(values):
    values = np.array([v for v in values if np.isfinite(v)])
    return tuple(np.percentile(values, [2.5, 97.5]))


def example(n=240, seed=0, shift=0.6):
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.45
    scores = np.round(rng.normal(size=n) + shift * member, 1)  # rounded: many ties
    return scores, member, scores > 0.2


@pytest.mark.parametrize("kind", ["balanced", "plain", "best_balanced", None])
def test_bootstrap_equals_a_literal_loop(kind):
    scores, member, said = example()
    run = Attacked(scores, member, kind, said if kind in ("balanced", "plain") else None)
    got = bootstrap(run, resamples=150, seed=3)
    draws = literal_draws([run], 150, 3)[0]
    for metric in intervals.METRICS:
        point = literal_metrics(scores, member, kind, said)[metric]
        if kind is None and metric == "accuracy":
            assert np.isnan(got[metric]).all()
            continue
        assert got[metric][0] == pytest.approx(point, rel=1e-12, abs=1e-12)
        assert got[metric][1:] == pytest.approx(literal_interval(draws[metric]), rel=1e-9, abs=1e-12)
        assert got[metric][1] <= point <= got[metric][2] or metric.startswith("TPR")


def test_bootstrap_is_seeded_and_covers_more_than_one_chunk():
    scores, member, said = example(n=60)
    run = Attacked(scores, member, "plain", said)
    resamples = intervals.CHUNK + 37
    assert bootstrap(run, resamples, seed=5) == bootstrap(run, resamples, seed=5)
    assert bootstrap(run, resamples, seed=5) != bootstrap(run, resamples, seed=6)
    draws = literal_draws([run], resamples, 5)[0]
    assert bootstrap(run, resamples, seed=5)["AUC"][1:] == pytest.approx(literal_interval(draws["AUC"]), rel=1e-9)


def test_a_resample_without_one_class_is_left_out():
    member = np.array([True, False, False, False])  # many resamples draw no member
    scores = np.array([0.9, 0.1, 0.2, 0.3])
    run = Attacked(scores, member, "best_balanced")
    got = bootstrap(run, resamples=200, seed=1)
    draws = literal_draws([run], 200, 1)[0]
    assert any(np.isnan(v) for v in draws["AUC"])
    assert got["AUC"][1:] == pytest.approx(literal_interval(draws["AUC"]))


def test_paired_difference_equals_a_literal_loop():
    scores, member, said = example(seed=1)
    other = np.round(scores + np.random.default_rng(9).normal(scale=0.8, size=len(scores)), 1)
    defense, base = Attacked(other, member, "balanced", other > 0.2), Attacked(scores, member, "balanced", said)
    got = paired_difference(defense, base, resamples=120, seed=2)
    d_draws, b_draws = literal_draws([defense, base], 120, 2)
    for metric in intervals.METRICS:
        point = (
            literal_metrics(other, member, "balanced", other > 0.2)[metric]
            - literal_metrics(scores, member, "balanced", said)[metric]
        )
        diffs = np.array(d_draws[metric]) - np.array(b_draws[metric])
        assert got[metric][0] == pytest.approx(point, abs=1e-12)
        assert got[metric][1:] == pytest.approx(literal_interval(diffs), rel=1e-9, abs=1e-12)
    # a run paired with itself did not change: the difference is exactly 0 in every resample
    assert paired_difference(base, base, resamples=50)["AUC"] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(defense, Attacked(scores, ~member, "balanced", said), resamples=10)


def test_tpr_at_an_fpr_below_ten_false_positives_is_not_measurable():
    assert measurable("TPR@1%FPR", 1000) and not measurable("TPR@1%FPR", 999)
    assert not measurable("TPR@0.1%FPR", 1300) and measurable("TPR@0.1%FPR", 10000)
    assert measurable("AUC", 3) and measurable("accuracy", 3)


def test_scores_files_old_and_new_and_aligned(tmp_path):
    scores, member, said = example(n=50)
    index = np.random.default_rng(0).permutation(50)
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    common = {
        "index": index,
        "member": member,
        "attacks": np.array(["Conf", "LiRA"]),
        "score_Conf": scores,
        "score_LiRA": np.where(member, np.inf, scores),
    }
    np.savez(new, **common, accuracy_kind=np.array(["balanced", "best_balanced"]), decision_Conf=said)
    np.savez(old, **common)  # written before decisions were saved
    got_index, runs = read_attacked(str(new), _rankable)
    assert (got_index == index).all() and runs["Conf"].accuracy_kind == "balanced"
    assert (runs["Conf"].decisions == said).all() and runs["LiRA"].accuracy_kind == "best_balanced"
    assert np.isfinite(runs["LiRA"].scores).all()
    _, old_runs = read_attacked(str(old), _rankable)
    assert old_runs["Conf"].accuracy_kind is None and old_runs["Conf"].decisions is None
    assert np.isnan(bootstrap(old_runs["Conf"], resamples=20)["accuracy"]).all()
    # the same samples in another order line up; other samples do not
    shuffle = np.random.default_rng(1).permutation(50)
    moved = Attacked(scores[shuffle], member[shuffle], "balanced", said[shuffle])
    _, b = align(index, runs["Conf"], index[shuffle], moved)
    assert (b.scores == scores).all() and (b.member == member).all() and (b.decisions == said).all()
    assert align(index, runs["Conf"], index + 1, moved) is None


def test_bootstrap_flags():
    import os

    import mia_modi
    import summarize
    from common import UsageError
    from conftest import REPO

    config = os.path.join(REPO, "config", "digits.json")
    flags = ["-1", config, "--pruner_name", "iter_prunetxt", "--prune_sparsity", "0.6"]
    assert mia_modi.get_args(flags).bootstrap == intervals.RESAMPLES == 1000
    assert mia_modi.get_args(flags + ["--bootstrap", "0"]).bootstrap == 0
    with pytest.raises(UsageError, match="--bootstrap is a number of resamples"):
        mia_modi.get_args(flags + ["--bootstrap", "-1"])
    assert summarize.get_args([]).bootstrap == 1000 and summarize.get_args(["--zoom"]).zoom
    with pytest.raises(UsageError, match="--bootstrap is a number of resamples"):
        summarize.get_args(["--bootstrap", "0"])
