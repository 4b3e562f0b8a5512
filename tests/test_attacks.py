"""attacks.py: threshold attacks against the literal quadratic loop, metric values by hand, the
sensitivity feature against its closed form on a linear model, the registry, and the NN attacks."""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import (
    ATTACKS,
    Outputs,
    best_threshold,
    conf_values,
    entr_values,
    mentr_values,
    model_outputs,
    parse_attacks,
    sensitivity,
    threshold_accuracy,
)
from common import UsageError
from datasets import TensorData
from splits import ModelSplit

# ---------------------------------------------------------------- threshold attacks vs the literal rule


def slow_threshold(member_values, nonmember_values):
    """The release's threshold rule as a quadratic loop: candidates = member values then non-member values;
    acc = 0.5 * (mean(member >= t) + mean(non-member < t)); first best kept (strict >); starts at 0."""
    best_t, best_acc = 0, 0
    for t in list(member_values) + list(nonmember_values):
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # mean of an empty side is nan: never best
            acc = 0.5 * (np.mean(member_values >= t) + np.mean(nonmember_values < t))
        if acc > best_acc:
            best_t, best_acc = t, acc
    return best_t


def slow_attack_accuracy(
    shadow_values, shadow_groups, shadow_member, victim_values, victim_groups, victim_member, num_groups
):
    thresholds = [
        slow_threshold(
            shadow_values[(shadow_groups == g) & shadow_member], shadow_values[(shadow_groups == g) & ~shadow_member]
        )
        for g in range(num_groups)
    ]
    said_member = np.array([v >= thresholds[g] for v, g in zip(victim_values, victim_groups)], dtype=bool)
    return thresholds, 100 * 0.5 * (np.mean(said_member[victim_member]) + np.mean(~said_member[~victim_member]))


def random_case(rng, num_groups, n):
    values = rng.integers(0, 6, n) / 5.0 + rng.choice([0.0, 0.05], n) * (rng.random() < 0.3)  # many ties
    groups = rng.integers(0, num_groups, n)
    member = rng.random(n) < rng.uniform(0.1, 0.9)
    return values, groups, member


def test_best_threshold_equals_literal_loop():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n_mem, n_non = rng.integers(0, 12), rng.integers(0, 12)
        if trial % 10 == 0:
            n_mem = 0 if trial % 20 == 0 else 1  # empty and single-sample sides
        mem, non = rng.integers(0, 4, n_mem) / 3.0, rng.integers(0, 4, n_non) / 3.0
        assert best_threshold(mem, non) == slow_threshold(mem, non), (mem, non)
    assert best_threshold(np.array([]), np.array([])) == 0
    assert best_threshold(np.array([0.7]), np.array([])) == 0  # an empty side never scores: stays 0
    assert best_threshold(np.array([0.9, 0.8]), np.array([0.1, 0.8])) == 0.9  # 0.9 first reaches 0.75


def test_threshold_accuracy_equals_literal_loop():
    rng = np.random.default_rng(1)
    for _ in range(60):
        num_groups = int(rng.integers(1, 7))
        sv, sg, sm = random_case(rng, num_groups, int(rng.integers(0, 40)))  # some classes get 0 or 1 samples
        vv, vg, vm = random_case(rng, num_groups, int(rng.integers(2, 60)))
        vm[0], vm[1] = True, False  # the victim has both kinds
        thresholds, want = slow_attack_accuracy(sv, sg, sm, vv, vg, vm, num_groups)
        for g in range(num_groups):
            in_g = sg == g
            assert best_threshold(sv[in_g & sm], sv[in_g & ~sm]) == thresholds[g]
        assert threshold_accuracy(sv, sg, sm, vv, vg, vm, num_groups) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_classes_with_zero_or_one_shadow_sample():
    # class 0: members only; class 1: a single non-member; class 2: absent from the shadows
    sv, sg, sm = np.array([0.9, 0.4, 0.3]), np.array([0, 0, 1]), np.array([True, True, False])
    vv, vg = np.array([0.5, 0.2, 0.1, 0.6]), np.array([0, 1, 2, 0])
    vm = np.array([True, False, False, True])
    thresholds, want = slow_attack_accuracy(sv, sg, sm, vv, vg, vm, 3)
    assert thresholds == [0, 0, 0]  # every class keeps the initial threshold 0: all called members
    assert want == 50.0
    assert threshold_accuracy(sv, sg, sm, vv, vg, vm, 3) == 50.0


# ---------------------------------------------------------------- metric values by hand

PROBS = np.array([[0.7, 0.2, 0.1], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
LABELS = np.array([0, 1, 1])
LOG0 = math.log(1e-20)  # every log argument is clamped at 1e-20


def test_conf_entr_mentr_by_hand():
    assert conf_values(PROBS, LABELS).tolist() == [0.7, 0.0, 0.0]
    entr = [
        0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1),
        2 * 0.5 * math.log(0.5),  # 0 * log(clamped 0) contributes 0
        0.0,
    ]
    assert entr_values(PROBS, LABELS) == pytest.approx(entr, rel=1e-12)
    # -modified entropy = (1 - p_y) log p_y + sum_{i != y} p_i log(1 - p_i)
    mentr = [
        0.3 * math.log(0.7) + 0.2 * math.log(0.8) + 0.1 * math.log(0.9),
        1.0 * LOG0 + 2 * 0.5 * math.log(0.5),
        1.0 * LOG0 + 1.0 * LOG0,
    ]  # p_y = 0 and a wrong class at probability 1
    assert mentr_values(PROBS, LABELS) == pytest.approx(mentr, rel=1e-12)
    assert mentr[2] == pytest.approx(-92.1034, abs=1e-4)


def outputs(probs, labels, member):
    return Outputs(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels), torch.tensor(member))


def test_threshold_attack_hconf_uses_one_threshold():
    """Class 0: members 0.9, non-members 0.8; class 1: members 0.5, non-members 0.4 (true-label
    probability). Per-class thresholds separate both classes; one threshold cannot (best 75%)."""
    probs = [[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.6, 0.4]] * 3
    labels, member = [0, 0, 1, 1] * 3, [True, False, True, False] * 3
    shadow = victim = outputs(probs, labels, member)
    results = ATTACKS["threshold"][0](shadow, victim, 2)
    assert [r.name for r in results] == ["Conf", "Entr", "Mentr", "Hconf"]
    acc = {r.name: r.accuracy for r in results}
    assert acc["Conf"] == 100.0 and acc["Hconf"] == 75.0
    vv = conf_values(np.array(probs, dtype=np.float64), np.array(labels))
    for r in results:
        assert r.scores.shape == (12,) and r.member.tolist() == member
    assert np.allclose(results[0].scores, vv)


def test_threshold_attack_matches_literal_loop_on_random_outputs():
    rng = np.random.default_rng(5)
    num_cls = 4

    def random_outputs(n):
        logits = rng.integers(0, 3, (n, num_cls)).astype(np.float64)  # few distinct rows: ties
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = rng.integers(0, num_cls - 1, n)  # the last class never appears
        return probs, labels, rng.random(n) < 0.6

    sp, sy, sm = random_outputs(200)
    vp, vy, vm = random_outputs(150)
    results = {r.name: r.accuracy for r in ATTACKS["threshold"][0](outputs(sp, sy, sm), outputs(vp, vy, vm), num_cls)}
    sp32, vp32 = (torch.tensor(p, dtype=torch.float32).double().numpy() for p in (sp, vp))  # what the attack sees
    for name, values in (("Conf", conf_values), ("Entr", entr_values), ("Mentr", mentr_values)):
        _, want = slow_attack_accuracy(values(sp32, sy), sy, sm, values(vp32, vy), vy, vm, num_cls)
        assert results[name] == pytest.approx(want, rel=1e-12)
    _, want = slow_attack_accuracy(
        conf_values(sp32, sy), np.zeros_like(sy), sm, conf_values(vp32, vy), np.zeros_like(vy), vm, 1
    )
    assert results["Hconf"] == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- sensitivity on a linear model


def linear_model(num_cls=3, dim=5, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(dim, num_cls, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(num_cls, dim, dtype=torch.float64))
    return model


def softmax_jacobian_rows(model, x):
    """For f(x) = Wx: d softmax / dx = (diag(p) - p p^T) W, one (C, D) matrix per sample."""
    p = F.softmax(model(x), 1)
    jac = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return jac @ model.weight


def test_sensitivity_with_fixed_noise_equals_jacobian(monkeypatch):
    model = linear_model()
    x = torch.randn(4, 5, dtype=torch.float64)
    draws = torch.randn(attacks.SENS_DRAWS, 4, 5, dtype=torch.float64)
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: draws.to(kw.get("dtype") or draws.dtype).clone())
    got = sensitivity(model, x)
    jac = softmax_jacobian_rows(model, x)  # (B, C, D)
    want = torch.einsum("bcd,kbd->kbc", jac, draws).abs().mean(0)  # mean over draws of |J u|
    assert got.shape == (4, 3)
    assert torch.allclose(got, want, rtol=2e-3, atol=1e-6)


def test_sensitivity_monte_carlo_matches_expectation():
    model = linear_model(seed=1)
    torch.manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64)
    got = sensitivity(model, x, draws=20000)
    # J u ~ N(0, ||J_c||^2) per class, so E|J_c u| = sqrt(2/pi) ||J_c||
    want = math.sqrt(2 / math.pi) * softmax_jacobian_rows(model, x).norm(dim=2)
    assert torch.allclose(got, want, rtol=0.03)


def test_model_outputs_members_then_nonmembers():
    model = linear_model(num_cls=3, dim=5)
    x = torch.randn(10, 5, dtype=torch.float64)
    data = TensorData(x, torch.arange(10) % 3)
    split = ModelSplit(torch.tensor([4, 1, 7]), torch.tensor([0]), torch.tensor([9, 2]))
    out = model_outputs(model, data, split, with_sens=True, batch_size=20)
    order = [4, 1, 7, 9, 2]
    assert out.labels.tolist() == [i % 3 for i in order]
    assert out.member.tolist() == [True, True, True, False, False]
    assert torch.allclose(out.probs, F.softmax(model(x[order]), 1))
    want = math.sqrt(2 / math.pi) * softmax_jacobian_rows(model, x[order]).norm(dim=2)
    assert out.sens.shape == (5, 3) and (out.sens > 0).all() and (out.sens < 3 * want).all()


# ---------------------------------------------------------------- registry and NN attacks


def test_parse_attacks_order_and_errors():
    core = ["samia", "threshold", "nn", "nn_top3", "nn_cls"]
    assert [a for a in ATTACKS if a in core] == core  # the log's order
    assert parse_attacks("nn_cls,threshold,samia") == ["samia", "threshold", "nn_cls"]
    assert parse_attacks(" nn , nn_top3,nn ") == ["nn", "nn_top3"]
    assert parse_attacks("threshold") == ["threshold"]
    for bad, named in (("nn,bogus", "'bogus'"), ("", "''"), ("Threshold", "'Threshold'"), (",", "','")):
        valid = "valid: samia, threshold, nn, nn_top3, nn_cls"
        with pytest.raises(UsageError, match=f"unknown attack {named}; {valid}") as err:
            parse_attacks(bad)
        assert "\n" not in str(err.value)
    assert [name for name, attack in ATTACKS.items() if attack.needs_sensitivity and name in core] == [
        "samia"
    ]  # needs sensitivity
    assert [n for name in core for n in ATTACKS[name].reports] == [
        "SAMIA",
        "Conf",
        "Entr",
        "Mentr",
        "Hconf",
        "NN",
        "Top3-NN",
        "NNCl",
    ]


def separable_outputs(rng, n, num_cls, with_sens):
    """Members: confident on their label; non-members: flat. Sensitivities follow the same split."""
    labels = torch.from_numpy(rng.integers(0, num_cls, n))
    member = torch.from_numpy(rng.random(n) < 0.5)
    flat = torch.full((n, num_cls), 1.0 / num_cls) + 0.02 * torch.from_numpy(rng.random((n, num_cls))).float()
    sharp = 0.02 * torch.ones(n, num_cls)
    sharp[torch.arange(n), labels] = 1.0
    probs = torch.where(member.unsqueeze(1), sharp, flat)
    probs = probs / probs.sum(1, keepdim=True)
    sens = torch.where(member.unsqueeze(1), 0.1 * probs, 5 * probs) if with_sens else None
    return Outputs(probs, labels, member, sens)


@pytest.mark.slow
@pytest.mark.parametrize("name,n_shadow", [("nn", 3000), ("samia", 800)])
def test_nn_attacks_learn_separable_features(monkeypatch, name, n_shadow):
    monkeypatch.setattr(attacks, "ATTACK_EPOCHS", 8)  # the real 100 epochs are exercised end to end
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shadow = separable_outputs(rng, n_shadow, 4, name == "samia")
    victim = separable_outputs(rng, 300, 4, name == "samia")
    (result,) = ATTACKS[name][0](shadow, victim, 4)
    assert result.name == {"nn": "NN", "samia": "SAMIA"}[name]
    assert result.accuracy > 95.0
    assert result.scores.shape == (300,) and result.member.tolist() == victim.member.tolist()
    said = result.scores > 0.5
    assert 100 * (said == result.member).mean() == pytest.approx(result.accuracy, abs=1e-4)


def test_nn_attack_features(monkeypatch):
    """What each NN attack feeds its attack model: captured from the shared training routine."""
    seen = {}

    def capture(log_name, kind, features, shadow, victim, num_cls, progress, schedule=None):
        seen[log_name] = (kind, features(shadow), features(victim))
        return []

    monkeypatch.setattr(attacks, "_nn_attack", capture)
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    sens = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    out = Outputs(probs, torch.tensor([2, 0]), torch.tensor([True, False]), sens)
    for name in ("samia", "nn", "nn_top3", "nn_cls"):
        ATTACKS[name].fn(out, out, 4)
    onehot = torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]])
    assert seen["NN"][0] == "mia_fc" and torch.equal(seen["NN"][1], probs)
    assert seen["Top3-NN"][0] == "mia_fc"
    assert torch.equal(seen["Top3-NN"][2], torch.tensor([[0.6, 0.2, 0.1], [0.4, 0.3, 0.2]]))
    assert seen["NNCl"][0] == "mia_fc" and torch.equal(seen["NNCl"][1], torch.cat([probs, onehot], 1))
    assert seen["SAMIA"][0] == "transformer" and torch.equal(seen["SAMIA"][2], torch.cat([probs, sens, onehot], 1))


@pytest.mark.parametrize("epochs, first_drop, second_drop", [(100, 50, 75), (80, 40, 60), (20, 10, 15)])
def test_nn_attack_training_recipe(monkeypatch, epochs, first_drop, second_drop):
    """SGD lr 0.001 momentum 0.9 wd 5e-4, batch 128, ATTACK_EPOCHS passes; lr x0.1 at half and three quarters
    of them (the release's 50 and 75 of 100)."""
    monkeypatch.setattr(attacks, "ATTACK_EPOCHS", epochs)
    calls = []

    def fake_pass(model, data, idx, optimizer, batch_size):
        group = optimizer.param_groups[0]
        calls.append(
            (type(optimizer), round(group["lr"], 10), group["momentum"], group["weight_decay"], batch_size, len(idx))
        )
        optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        return 0.0, 0.0

    monkeypatch.setattr(attacks, "train_pass", fake_pass)
    rng = np.random.default_rng(0)
    out = separable_outputs(rng, 50, 4, False)
    ATTACKS["nn"][0](out, out, 4)
    assert len(calls) == epochs
    assert calls[0] == (torch.optim.SGD, 1e-3, 0.9, 5e-4, 128, 50)
    lrs = [c[1] for c in calls]
    assert lrs == [1e-3] * first_drop + [1e-4] * (second_drop - first_drop) + [1e-5] * (epochs - second_drop)


@pytest.mark.parametrize("semantics, batch", [("release", 32), ("corrected", 128)])
def test_nn_attack_batches_follow_the_semantics(monkeypatch, semantics, batch):
    """The NN attacks' training batches: --batch_size (here 32) under release, 128 under corrected; --attack_epochs
    epochs (here 1)."""
    torch.manual_seed(0)
    options = SimpleNamespace(batch_size=32, attack_epochs=1)
    assert attacks.nn_schedule(semantics, options) == (batch, 1)
    assert attacks.nn_schedule(semantics, None) == (128, 100)
    sizes = []
    original = attacks.train_pass
    monkeypatch.setattr(
        attacks,
        "train_pass",
        lambda model, data, idx, opt, batch_size: (
            sizes.append([len(b) for b in idx.split(batch_size)]) or original(model, data, idx, opt, batch_size)
        ),
    )
    n = 300
    probs = torch.softmax(torch.randn(n, 4), 1)
    out = Outputs(probs, torch.randint(0, 4, (n,)), torch.arange(n) % 2 == 0)
    ATTACKS["nn"].fn(out, out, 4, attacks.Progress(True), semantics, options)
    assert sizes == [[batch] * (n // batch) + ([n % batch] if n % batch else [])]
