"""Offline RMIA against a literal reference written from its definition, its tuning of a, the references'
membership taken from the split, and a tiny mia_modi.py run."""

import numpy as np
import pytest
import torch

import attacks
import mia_modi
from attacks import References
from conftest import REPO
from helpers import DIGITS, one_thread, run_main
from splits import Split


def slow_score(target_x, ref_x, out_x, target_z, ref_z, out_z, a, gamma):
    """score(x) = fraction of z with ratio(x) / ratio(z) > gamma, ratio = p(.|target) / p(.),
    p(.) = (1 + a) / 2 * mean over OUT reference models of p(.|ref) + (1 - a) / 2; loops only."""

    def ratio(target, refs, outs, i):
        kept = [refs[k][i] for k in range(len(refs)) if outs[k][i]]
        if not kept:
            return None
        return target[i] / ((1 + a) / 2 * (sum(kept) / len(kept)) + (1 - a) / 2)

    z_ratios = [ratio(target_z, ref_z, out_z, j) for j in range(len(target_z))]
    scores = []
    for i in range(len(target_x)):
        rx = ratio(target_x, ref_x, out_x, i)
        scores.append(np.nan if rx is None else sum(rx / rz > gamma for rz in z_ratios) / len(z_ratios))
    return np.array(scores)


def table(prob, trained, attacked, rows, n_train):
    return References(
        np.asarray(rows),
        n_train,
        np.asarray(prob, dtype=np.float64),
        np.asarray(trained, bool),
        [np.asarray(p) for p in attacked],
    )


def handmade():
    """Victim (model 0) and three shadows on 8 rows; rows 0-4 training rows (the victim attacks 0-3 and
    test row 5), rows 5-7 test rows. Row 7 is the only z (row 6 a shadow trained on: not a population row).
    Row 1 has a single OUT reference; rows 2 and 3 tie with each other and with z."""
    prob = [
        [0.9, 0.6, 0.5, 0.5, 0.3, 0.2, 0.4, 0.5],
        [0.7, 0.9, 0.5, 0.5, 0.2, 0.3, 0.9, 0.5],
        [0.4, 0.8, 0.5, 0.5, 0.4, 0.2, 0.1, 0.5],
        [0.6, 0.3, 0.5, 0.5, 0.6, 0.1, 0.2, 0.5],
    ]
    trained = np.zeros((4, 8), bool)
    trained[0, [0, 1, 2]] = True  # the victim's members
    trained[1, [1, 3, 4]] = True
    trained[2, [1, 3, 6]] = True  # row 6: a test row a shadow trained on is no population row
    trained[3, [0, 4]] = True
    attacked = [[0, 1, 2, 3, 5], [1, 3, 4, 0], [1, 3, 6, 2], [0, 4, 2]]
    return table(prob, trained, attacked, range(8), 5)


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
def test_scores_match_the_literal_definition(a, gamma):
    refs = handmade()
    assert list(refs.population(0)) == [7]  # a z set of size 1
    scores, member, has_out = attacks.rmia_attack_model(refs, 0, [1, 2, 3], a, gamma)
    x, z = refs.attacked[0], refs.population(0)
    out = ~refs.trained[1:]
    expected = slow_score(
        refs.prob[0, x], refs.prob[1:, x], out[:, x], refs.prob[0, z], refs.prob[1:, z], out[:, z], a, gamma
    )
    assert out[:, 1].sum() == 1 and out[:, 0].sum() == 2  # row 1: a single OUT reference (shadow 3)
    np.testing.assert_array_equal(scores, expected)
    assert list(member) == [True, True, True, False, False] and has_out.all()
    if gamma == 1.0:
        assert scores[2] == scores[3] == 0.0  # ties with z do not count: ratio(x) / ratio(z) = 1 is not > 1


def test_no_out_reference_scores_nan_and_larger_population():
    refs = handmade()
    scores, member, has_out = attacks.rmia_attack_model(refs, 1, [2], 0.5, 1.0)  # shadow 0 attacked, 1 reference
    assert list(refs.population(1)) == [5, 7]  # test rows outside shadow 0's attacked rows, no one trained on
    x, z = refs.attacked[1], refs.population(1)
    out = ~refs.trained[[2]]
    expected = slow_score(
        refs.prob[1, x], refs.prob[[2]][:, x], out[:, x], refs.prob[1, z], refs.prob[[2]][:, z], out[:, z], 0.5, 1.0
    )
    assert list(has_out) == [False, False, True, True]  # rows 1 and 3: the one reference trained on them
    np.testing.assert_array_equal(np.isnan(scores), np.isnan(expected))
    np.testing.assert_array_equal(scores[has_out], expected[has_out])


def test_random_tables_match_the_literal_definition():
    rng = np.random.default_rng(0)
    for _trial in range(20):
        models, rows = int(rng.integers(3, 7)), 40
        prob = np.round(0.1 + 0.9 * rng.random((models, rows)), 1)  # rounding makes many ties
        trained = rng.random((models, rows)) < 0.4
        trained[:, 30:] = False
        attacked = [rng.permutation(30)[:20] for _ in range(models)]
        refs = table(prob, trained, attacked, range(rows), 30)
        a, gamma = float(rng.choice(attacks.RMIA_A_GRID)), float(rng.choice([1.0, 0.8, 1.25]))
        scores, _, _ = attacks.rmia_attack_model(refs, 0, list(range(1, models)), a, gamma)
        x, z = refs.attacked[0], refs.population(0)
        out = ~trained[1:]
        expected = slow_score(prob[0, x], prob[1:, x], out[:, x], prob[0, z], prob[1:, z], out[:, z], a, gamma)
        np.testing.assert_array_equal(np.isnan(scores), np.isnan(expected))
        np.testing.assert_array_equal(scores[~np.isnan(scores)], expected[~np.isnan(expected)])


def slow_auc(scores, member):
    pos, neg = scores[member], scores[~member]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_tuning_keeps_the_best_auc_over_samples_with_an_out_reference():
    rng = np.random.default_rng(1)
    models, rows = 5, 120
    trained = np.zeros((models, rows), bool)
    for m in range(models):
        trained[m, rng.permutation(80)[:50]] = True
    attacked = [np.concatenate([np.flatnonzero(trained[m]), 80 + rng.permutation(40)[:20]]) for m in range(models)]
    # the target's members get a higher probability; the references differ per row (difficulty)
    difficulty = rng.random(rows)
    prob = np.clip(difficulty + 0.1 * rng.standard_normal((models, rows)) + 0.15 * trained, 0.01, 1.0)
    refs = table(prob, trained, attacked, range(rows), 80)
    a, aucs, (tune_scores, tune_member) = attacks.rmia_tune(refs, 1.0)
    target, others = 1 + attacks.RMIA_TUNE_SHADOW, [2, 3, 4]
    x, z = refs.attacked[target], refs.population(target)
    out = ~trained[others]
    has_out = out[:, x].any(0)
    assert 0 < has_out.sum() < len(x)  # some members have every other shadow IN: they are left out
    expected = []
    for candidate in attacks.RMIA_A_GRID:
        s = slow_score(
            prob[target, x],
            prob[others][:, x],
            out[:, x],
            prob[target, z],
            prob[others][:, z],
            out[:, z],
            candidate,
            1.0,
        )
        expected.append(slow_auc(s[has_out], trained[target, x][has_out]))
    np.testing.assert_allclose(aucs, expected, rtol=0, atol=1e-12)
    assert a == attacks.RMIA_A_GRID[int(np.argmax(expected))]
    assert len(tune_member) == has_out.sum() and (tune_member == trained[target, x][has_out]).all()
    assert len(set(np.round(aucs, 12))) > 1  # a matters here


def test_membership_comes_from_the_split():
    split = Split.create("digits", 1437, 360, 7, 3)
    splits = [split.indices()] + [split.indices(i) for i in range(3)]
    rows = References.all_rows(splits[0], 1797)
    refs = References.from_split(splits, rows, 1437, np.zeros((4, len(rows))))
    assert sorted(rows) == list(range(1797))
    victim_attacked = torch.cat([splits[0].train, splits[0].test]).numpy()
    assert (rows[: len(victim_attacked)] == victim_attacked).all()
    for m, s in enumerate(splits):
        assert set(rows[refs.trained[m]]) == set(s.train.numpy())
        assert (rows[refs.attacked[m]] == torch.cat([s.train, s.test]).numpy()).all()
    z = rows[refs.population(0)]
    assert (z >= 1437).all() and set(z) == set(splits[0].dev.numpy()) & set(range(1437, 1797))


# ---------------------------------------------------------------- a tiny mia_modi.py run


def test_mia_modi_logs_rmia_and_saves_its_scores(tmp_path, monkeypatch):
    tiny = ["--shadow_num", "3", "--quiet", "--no_tensorboard"]
    with one_thread():
        run_main("pretrain_modi", ["-1", DIGITS, "--epochs", "3", *tiny], tmp_path, monkeypatch)
        run_main(
            "mia_modi",
            ["-1", DIGITS, "--original", "--attacks", "rmia", "--rmia_gamma", "1.5", *tiny],
            tmp_path,
            monkeypatch,
        )
    from test_metrics import metric_reference, reference_outputs

    shadow, victim, victim_model, data, split, shadow_logits = reference_outputs(tmp_path, 3)
    lines = (tmp_path / "log" / "digits_columnfc" / "l1unstructure_0.6_base.txt").read_text().splitlines()
    scores_file = tmp_path / lines[-1].removeprefix("Scores: ")

    # the literal reference from the checkpoints: every model's true-label probability on every row
    splits = [split.indices()] + [split.indices(i) for i in range(3)]
    n_train = int(split.meta["n_train"])
    victim_x = torch.cat([splits[0].train, splits[0].test])
    test_rows = torch.arange(n_train, len(data))
    z = test_rows[~torch.isin(test_rows, victim_x)]

    def p(logits, rows):
        return torch.softmax(logits.double(), 1)[torch.arange(len(rows)), data.y[rows]].numpy()

    from train import predict

    all_models = [victim_model] + [reference_model(tmp_path, i) for i in range(3)]

    def slow_attack(target, refs, x, a):
        """The literal scores of model `target` on rows x, z = test rows outside x; OUT from the split."""
        zz = test_rows[~torch.isin(test_rows, x)]
        px, pz = ([p(predict(all_models[m], data, rows), rows) for m in [target] + refs] for rows in (x, zz))
        out_x = np.stack([~torch.isin(x, splits[m].train).numpy() for m in refs])
        out_z = np.stack([~torch.isin(zz, splits[m].train).numpy() for m in refs])
        return slow_score(px[0], np.stack(px[1:]), out_x, pz[0], np.stack(pz[1:]), out_z, a, 1.5), out_x.any(0)

    tune_x = torch.cat([splits[1].train, splits[1].test])
    tune_member = torch.isin(tune_x, splits[1].train).numpy()
    tuned = [slow_attack(1, [2, 3], tune_x, a) for a in attacks.RMIA_A_GRID]
    has_out = tuned[0][1]
    aucs = [slow_auc(s[has_out], tune_member[has_out]) for s, _ in tuned]
    a = attacks.RMIA_A_GRID[int(np.argmax(aucs))]
    expected, _ = slow_attack(0, [1, 2, 3], victim_x, a)
    member = victim.member.numpy()
    tune_scores, tune_m = tuned[int(np.argmax(aucs))][0][has_out], tune_member[has_out]
    candidates = np.concatenate([tune_scores[tune_m], tune_scores[~tune_m]])
    balanced = [0.5 * ((tune_scores[tune_m] >= t).mean() + (tune_scores[~tune_m] < t).mean()) for t in candidates]
    cut = candidates[int(np.argmax(balanced))]
    accuracy = 100 * 0.5 * ((expected[member] >= cut).mean() + (expected[~member] < cut).mean())
    block = lines[next(i for i, line in enumerate(lines) if line.startswith("RMIA attack accuracy: ")) :]
    assert block[0] == f"RMIA attack accuracy: {accuracy:.3f}"
    assert block[1:4] == metric_reference("RMIA", expected, member)
    assert block[4] == (
        f"RMIA a: {a:g} (AUC {max(aucs):.4f} on shadow 0's {has_out.sum()} samples with an OUT "
        f"reference, {tune_m.sum()} members), gamma 1.5, {len(z)} population samples"
    )
    with np.load(scores_file, allow_pickle=False) as saved:
        np.testing.assert_allclose(saved["score_RMIA"], expected, rtol=0, atol=1e-12)
        assert list(saved["attacks"]) == ["RMIA"]


def reference_model(tmp_path, i):
    from models import build_model
    from train import load_checkpoint

    model = build_model("columnfc", 10, 64)
    load_checkpoint(model, tmp_path / "result" / "digits_columnfc" / f"shadow_model_{i}" / "best.pth", "ckpt", "")
    return model


def test_rmia_needs_two_shadows_and_a_positive_gamma():
    base = ["-1", f"{REPO}/config/digits.json", "--attacks", "rmia", "--original"]
    with pytest.raises(attacks.UsageError, match="attack rmia needs --shadow_num >= 2, got 1"):
        mia_modi.get_args(base + ["--shadow_num", "1"])
    with pytest.raises(attacks.UsageError, match="--rmia_gamma must be a finite number > 0"):
        mia_modi.get_args(base + ["--rmia_gamma", "0"])


def test_tuning_needs_members_and_non_members_with_an_out_reference():
    refs = handmade()
    refs.trained[2:, :5] = True  # the other shadows trained on every training row, all of shadow 0's samples
    with pytest.raises(attacks.UsageError, match="samples with an OUT reference among the other shadows are none"):
        attacks.rmia_tune(refs, 1.0)
