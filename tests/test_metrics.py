"""AUC / TPR@low-FPR lines, offline LiRA, and the unchanged accuracy lines of mia_modi.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

import attacks
from attacks import ATTACKS, AttackResult, Outputs
from datasets import TensorData, get_dataset
from helpers import DIGITS, one_thread, run_main
from models import build_model
from reporting import results
from splits import Split
from train import evaluate, load_checkpoint, predict

# ---------------------------------------------------------------- ROC metrics on a known ROC


def known_roc():
    """1000 non-members scored 0..999 and 100 members placed between them by hand."""
    nonmember = np.arange(1000.0)
    member = np.concatenate(
        [
            2000 + np.arange(40.0),  # above every non-member: FPR 0
            np.full(10, 998.5),  # one non-member above: FPR exactly 0.1%
            np.full(20, 994.5),  # five above: FPR 0.5%
            np.full(5, 989.5),  # ten above: FPR exactly 1%
            np.full(25, 500.5),
        ]
    )  # 499 above: FPR 49.9%
    scores = np.concatenate([member, nonmember])
    truth = np.concatenate([np.ones(100, bool), np.zeros(1000, bool)])
    # AUC = P[member score > non-member score], counted per member group
    auc = (40 * 1000 + 10 * 999 + 20 * 995 + 5 * 990 + 25 * 501) / (100 * 1000)
    return scores, truth, auc


def test_roc_metrics_on_a_hand_made_roc():
    scores, truth, auc = known_roc()
    got_auc, tpr_at = attacks.roc_metrics(scores, truth)
    assert got_auc == pytest.approx(auc, abs=1e-12)
    # TPR at the largest FPR <= target, both boundaries inclusive
    assert tpr_at[0.01] == pytest.approx(75.0) and tpr_at[0.001] == pytest.approx(50.0)
    rng = np.random.default_rng(0)  # the order of the samples does not matter
    order = rng.permutation(len(scores))
    assert attacks.roc_metrics(scores[order], truth[order]) == (got_auc, tpr_at)


def test_roc_metrics_constant_score_and_non_finite():
    truth = np.array([True] * 50 + [False] * 150)
    auc, tpr_at = attacks.roc_metrics(np.ones(200), truth)
    assert auc == 0.5 and tpr_at == {0.01: 0.0, 0.001: 0.0}  # no threshold reaches FPR <= 1%
    # a diverged model: +inf ranks highest, nan / -inf lowest, instead of crashing sklearn
    scores = np.array([np.inf, 3.0, np.nan, 1.0, -np.inf, 2.0])
    member = np.array([True, True, True, False, False, False])
    assert attacks.roc_metrics(scores, member)[0] == roc_auc_score(member, [9, 3, -9, 1, -9, 2])


def test_metric_lines_format_and_summarize_reads_them(tmp_path):
    result = AttackResult("Conf", 62.5, np.array([4.0, 3.0, 2.0, 1.0]), np.array([True, False, True, False]))
    lines = attacks.metric_lines(result)
    assert lines == ["Conf attack AUC: 0.7500", "Conf attack TPR@1%FPR: 50.000", "Conf attack TPR@0.1%FPR: 50.000"]
    folder = tmp_path / "log" / "digits_columnfc"
    folder.mkdir(parents=True)
    text = [
        "Victim pruned model test accuracy: 80.000",
        "Shadows: l1unstructure_0.6 (base)",
        f"Conf attack accuracy: {result.accuracy:.3f}",
    ] + lines
    (folder / "l1unstructure_0.6_base.txt").write_text("\n".join(text) + "\n")
    row = results.parse_logs(tmp_path / "log").iloc[0]
    assert (row["Conf_acc"], row["Conf_auc"], row["Conf_tpr1"], row["Conf_tpr01"]) == (62.5, 0.75, 50.0, 50.0)


def test_best_balanced_accuracy_matches_brute_force():
    rng = np.random.default_rng(1)
    member = rng.random(300) < 0.7
    scores = rng.normal(size=300) + member
    brute = max(0.5 * ((scores[member] >= t).mean() + (scores[~member] < t).mean()) for t in np.append(scores, np.inf))
    assert attacks.best_balanced_accuracy(scores, member) == pytest.approx(100 * brute)


# ---------------------------------------------------------------- LiRA on synthetic outputs


def logits_for(log_odds, labels, num_cls):
    """Logits whose true-label log-odds log(p_y / (1 - p_y)) equal log_odds (other logits 0)."""
    z = torch.zeros(len(labels), num_cls, dtype=torch.float64)
    z[torch.arange(len(labels)), labels] = log_odds + math.log(num_cls - 1)
    return z


def synthetic(shift, n=2000, shadows=4, num_cls=10, seed=0):
    """Samples with very different difficulty (per-sample log-odds level, sd 3); training adds `shift`
    to a member's log-odds; every model adds its own noise (sd 0.5). Returns (shadow, victim) Outputs:
    the shadows' own members/non-members and the victim's with the shadows' logits on its samples."""
    g = torch.Generator().manual_seed(seed)

    def outputs(difficulty, labels, member):
        z = logits_for(
            difficulty + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) + shift * member, labels, num_cls
        )
        return Outputs(F.softmax(z, 1), labels, member, logits=z)

    member = torch.arange(n) < n // 2
    shadow = outputs(
        3 * torch.randn(n, generator=g, dtype=torch.float64), torch.randint(num_cls, (n,), generator=g), member
    )
    difficulty = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    victim = outputs(difficulty, torch.randint(num_cls, (n,), generator=g), member)
    victim.shadow_logits = torch.stack(
        [outputs(difficulty, victim.labels, torch.zeros(n, dtype=torch.bool)).logits for _ in range(shadows)]
    )
    return shadow, victim


def auc_of(result):
    return roc_auc_score(result.member, result.scores)


def test_lira_beats_conf_when_members_are_shifted():
    shadow, victim = synthetic(shift=1.5)
    [lira] = attacks.lira(shadow, victim, 10)
    conf = next(r for r in attacks.threshold(shadow, victim, 10) if r.name == "Conf")
    assert lira.name == "LiRA" and auc_of(lira) > 0.85
    assert auc_of(lira) > auc_of(conf) + 0.15  # per-sample calibration removes the difficulty
    assert lira.accuracy == pytest.approx(attacks.best_balanced_accuracy(lira.scores, lira.member))
    assert 75 < lira.accuracy <= 100


def test_lira_without_shift_is_chance():
    shadow, victim = synthetic(shift=0.0)
    [lira] = attacks.lira(shadow, victim, 10)
    assert abs(auc_of(lira) - 0.5) < 0.04


def test_lira_scores_match_a_slow_reference():
    rng = np.random.default_rng(2)
    shadow_values, victim_values = rng.normal(size=(3, 50)), rng.normal(size=50) + 0.5
    pooled = sum(((row - shadow_values.mean(0)) ** 2).sum() for row in shadow_values) / (50 * 2)
    expected = [-norm.logsf(v, loc=m, scale=math.sqrt(pooled)) for v, m in zip(victim_values, shadow_values.mean(0))]
    got = attacks.lira_scores(torch.from_numpy(shadow_values), torch.from_numpy(victim_values))
    assert np.allclose(got.numpy(), expected, rtol=1e-10)
    # one shadow: no spread around its own mean, so the spread over samples; still finite and ordered
    one = attacks.lira_scores(torch.from_numpy(shadow_values[:1]), torch.from_numpy(victim_values)).numpy()
    z = (victim_values - shadow_values[0]) / shadow_values[0].std(ddof=1)
    assert np.isfinite(one).all() and np.allclose(one, -norm.logsf(z), rtol=1e-10)
    # far in the upper tail: finite and still increasing
    far = attacks.lira_scores(
        torch.zeros(2, 1, dtype=torch.float64) + torch.tensor([[-1.0], [1.0]]),
        torch.tensor([40.0, 60.0], dtype=torch.float64),
    )
    assert np.allclose(far.numpy(), -norm.logsf(np.array([40.0, 60.0]) / math.sqrt(2)), rtol=1e-10)
    assert far[1] > far[0] > 300  # a survival function in float64 would be 0 here, -log of it inf


def test_lira_per_sample_variances_from_the_threshold_on():
    rng = np.random.default_rng(3)
    count = attacks.LIRA_PER_SAMPLE_VAR_MIN
    shadow_values = rng.normal(size=(count, 40)) * rng.uniform(0.5, 3, size=40)
    victim_values = rng.normal(size=40)
    mean = shadow_values.mean(0)
    per_sample = [
        -norm.logsf(v, loc=m, scale=math.sqrt(sum((row[i] - m) ** 2 for row in shadow_values) / (count - 1)))
        for i, (v, m) in enumerate(zip(victim_values, mean))
    ]
    got = attacks.lira_scores(torch.from_numpy(shadow_values), torch.from_numpy(victim_values)).numpy()
    assert np.allclose(got, per_sample, rtol=1e-10)
    fewer = torch.from_numpy(shadow_values[: count - 1])
    pooled = attacks.lira_scores(fewer, torch.from_numpy(victim_values), per_sample=False).numpy()
    assert np.array_equal(attacks.lira_scores(fewer, torch.from_numpy(victim_values)).numpy(), pooled)
    forced = attacks.lira_scores(fewer, torch.from_numpy(victim_values), per_sample=True).numpy()
    assert not np.allclose(forced, pooled)


def test_logit_confidence_is_stable():
    logits = torch.tensor([[2.0, 0.5, -1.0], [80.0, 0.0, 0.0], [0.0, 0.0, -200.0]])
    labels = torch.tensor([0, 0, 2])
    got = attacks.logit_confidence(logits, labels)
    p = F.softmax(logits[0].double(), 0)[0]
    assert got[0].item() == pytest.approx(torch.log(p / (1 - p)).item(), rel=1e-12)
    assert got[1].item() == pytest.approx(80 - math.log(2), rel=1e-12)  # p_y rounds to 1 in float32
    assert got[2].item() == pytest.approx(-200 - math.log(2), rel=1e-12)


def test_registry_flags_and_order():
    assert ATTACKS["lira"].needs_shadow_logits and not ATTACKS["lira"].needs_sensitivity
    assert ATTACKS["samia"].needs_sensitivity and not ATTACKS["samia"].needs_shadow_logits
    assert [name for name, a in ATTACKS.items() if a.needs_shadow_logits] == ["lira"]
    assert attacks.parse_attacks("lira,threshold") == ["threshold", "lira"]


# ---------------------------------------------------------------- a tiny mia_modi.py run


def reference_outputs(tmp_path, shadow_num):
    """Every model's outputs, computed here from the checkpoints with the pre-existing helpers."""
    train, test = get_dataset("digits")
    data = TensorData.concat(train, test)
    split = Split.load(tmp_path / "result" / "digits_columnfc" / "split.npz")

    def load(folder):
        model = build_model("columnfc", 10, 64)
        load_checkpoint(model, tmp_path / "result" / "digits_columnfc" / folder / "best.pth", "ckpt", "")
        return model

    shadows = [load(f"shadow_model_{i}") for i in range(shadow_num)]
    shadow = Outputs.cat([attacks.model_outputs(m, data, split.indices(i), False) for i, m in enumerate(shadows)])
    victim_model = load("victim_model")
    victim = attacks.model_outputs(victim_model, data, split.indices(), False)
    victim_rows = torch.cat([split.indices().train, split.indices().test])
    shadow_logits = [predict(m, data, victim_rows) for m in shadows]
    return shadow, victim, victim_model, data, split, shadow_logits


def slow_lira(shadow_logits, victim):
    """LiRA from log-softmax, without the attack's helpers."""

    def log_odds(z):
        logp = F.log_softmax(z.double(), 1)[torch.arange(len(victim.labels)), victim.labels]
        return (logp - torch.log1p(-logp.exp())).numpy()

    values = np.stack([log_odds(z) for z in shadow_logits])
    mean = values.mean(0)
    var = ((values - mean) ** 2).sum() / (values.shape[1] * (len(values) - 1))
    return -norm.logsf(log_odds(victim.logits), loc=mean, scale=math.sqrt(var))


def metric_reference(name, scores, member):
    """The three new lines from a brute-force ROC: TPR at the largest FPR <= target."""
    member = np.asarray(member, bool)
    fpr = [(scores[~member] >= t).mean() for t in np.append(scores, np.inf)]
    tpr = [(scores[member] >= t).mean() for t in np.append(scores, np.inf)]
    best = lambda target: 100 * max(t for f, t in zip(fpr, tpr) if f <= target)
    return [
        f"{name} attack AUC: {roc_auc_score(member, scores):.4f}",
        f"{name} attack TPR@1%FPR: {best(0.01):.3f}",
        f"{name} attack TPR@0.1%FPR: {best(0.001):.3f}",
    ]


def test_mia_log_keeps_accuracy_lines_and_adds_metrics(tmp_path, monkeypatch):
    """A tiny digits run of the scripts' main() in this process (a subprocess costs seconds of imports)."""
    tiny = ["--shadow_num", "2", "--quiet", "--no_tensorboard"]
    with one_thread():
        run_main("pretrain_modi", ["-1", DIGITS, "--epochs", "3", *tiny], tmp_path, monkeypatch)
        run_main("mia_modi", ["-1", DIGITS, "--original", "--attacks", "lira,threshold", *tiny], tmp_path, monkeypatch)
        shadow, victim, victim_model, data, split, shadow_logits = reference_outputs(tmp_path, 2)
    lines = (tmp_path / "log" / "digits_columnfc" / "l1unstructure_0.6_base.txt").read_text().splitlines()
    scores = lines.pop()  # the run's last line names its scores file (tests/test_report.py reads it)
    assert scores.startswith("Scores: result/digits_columnfc/scores/l1unstructure_0.6_original_release_")
    test_acc, _ = evaluate(victim_model, data, split.indices().test)
    results = attacks.threshold(shadow, victim, 10)  # the accuracy lines as they were before the metrics
    member = victim.member.numpy()
    old_format = [f"Victim original model test accuracy: {test_acc:.3f}", "Shadows: original", "Semantics: release"] + [
        f"{r.name} attack accuracy: {r.accuracy:.3f}" for r in results
    ]
    new_line = lambda line: line.startswith("LiRA ") or " attack AUC: " in line or " attack TPR@" in line
    assert [line for line in lines if not new_line(line)] == old_format

    expected = list(old_format)
    for r in results:
        at = expected.index(f"{r.name} attack accuracy: {r.accuracy:.3f}")
        expected[at + 1 : at + 1] = metric_reference(r.name, r.scores, member)
    lira_scores = slow_lira(shadow_logits, victim)
    brute_acc = max(
        0.5 * ((lira_scores[member] >= t).mean() + (lira_scores[~member] < t).mean())
        for t in np.append(lira_scores, np.inf)
    )
    expected += [f"LiRA attack accuracy: {100 * brute_acc:.3f}"] + metric_reference("LiRA", lira_scores, member)
    assert lines == expected
