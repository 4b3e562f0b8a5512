"""The audit (audit.py and its step modules in auditing/, its plan and report): canaries, the membership matrix and
the mem-score estimate against slow literal references; the tuned DP noise rule; the steps' refusals, resume,
batched == sequential Base pruning, and audit.csv against numbers recomputed from the saved logits. The
end-to-end part runs one tiny audit (M = 4, 2 epochs) once."""

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
import torch

import audit
from auditing import loo_attacks
from auditing import plan as audit_plan
from auditing import report as audit_report
from common import MissingError, UsageError
from conftest import REPO, as_repo, run_script
from intervals import measurable
from memscores import read_memscores

CONFIG = os.path.join(REPO, "config", "digits.json")
TINY = ["--epochs", "2", "--quiet", "--no_tensorboard", "--batch_size", "64"]
PRUNING = ["--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "2"]
SLIDE_RE = ["--defend", "slide_re", "--stride", "1", "--width", "5"]


# ---------------------------------------------------------------- the plan against literal references


def literal_canaries(labels, k, num_cls, seed):
    """The same draws as insert_canaries, applied one canary at a time: the j-th other class, ascending."""
    rng = np.random.default_rng([seed, audit_plan.STREAMS["canaries"]])
    rows = sorted(rng.choice(len(labels), size=k, replace=False).tolist())
    draws = rng.integers(0, num_cls - 1, size=k)
    new = list(labels)
    for row, j in zip(rows, draws):
        others = [c for c in range(num_cls) if c != labels[row]]
        new[row] = others[j]
    return rows, new


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_canaries_equal_the_literal_reference_and_change_only_their_rows(seed):
    labels = np.random.default_rng(seed).integers(0, 10, 300)
    rows, new = audit_plan.insert_canaries(labels, 40, 10, seed)
    ref_rows, ref_new = literal_canaries(labels.tolist(), 40, 10, seed)
    assert rows.tolist() == ref_rows and new.tolist() == ref_new
    assert len(set(rows.tolist())) == 40
    assert (new[rows] != labels[rows]).all()  # every canary is mislabelled
    others = np.setdiff1d(np.arange(300), rows)
    assert (new[others] == labels[others]).all()  # nothing else changes
    again_rows, again_new = audit_plan.insert_canaries(labels, 40, 10, seed)
    assert (again_rows == rows).all() and (again_new == new).all()  # seeded
    assert not np.array_equal(audit_plan.insert_canaries(labels, 40, 10, seed + 1)[0], rows)


def test_canary_labels_are_uniform_over_the_other_classes():
    labels = np.repeat(np.arange(5), 4000)
    rows, new = audit_plan.insert_canaries(labels, 16000, 5, 3)
    for true in range(5):
        picked = new[rows][labels[rows] == true]
        counts = np.bincount(picked, minlength=5)
        assert counts[true] == 0
        share = counts[np.arange(5) != true] / len(picked)
        assert np.abs(share - 0.25).max() < 0.03  # 3200 draws per class: sd of a share is 0.008


def test_membership_gives_every_model_exactly_half_with_its_own_seeded_draw():
    member = audit_plan.membership(64, 539, 7)
    assert member.shape == (64, 539) and (member.sum(1) == 269).all()
    assert (audit_plan.membership(64, 539, 7) == member).all()
    assert not (audit_plan.membership(64, 539, 8) == member).all()
    assert (audit_plan.membership(8, 539, 7) == member[:8]).all()  # model m's half does not depend on M
    share = member.mean(0)
    assert 0.25 < share.min() and share.max() < 0.75 and abs(share.mean() - 0.5) < 0.01
    tuning = audit_plan.membership(64, 539, 7, "tuning")
    assert not (tuning == member).all()  # the tuning shadows draw apart


def test_feldman_estimate_equals_a_loop_over_models():
    rng = np.random.default_rng(0)
    member = rng.random((6, 50)) < 0.5
    member[:, 0], member[:, 1] = True, False  # rows without an OUT / an IN model
    correct = rng.random((6, 50)) < 0.7
    scores, lacking = audit_plan.feldman_memscores(correct, member)
    without = 0
    for i in range(50):
        ins = [correct[m, i] for m in range(6) if member[m, i]]
        outs = [correct[m, i] for m in range(6) if not member[m, i]]
        want = sum(ins) / len(ins) - sum(outs) / len(outs) if ins and outs else 0.0
        without += not (ins and outs)
        assert scores[i] == pytest.approx(want, abs=1e-12)
    assert lacking == without >= 2


def test_default_canaries_make_tpr_at_1pct_measurable_in_expectation():
    k = audit_plan.default_canaries(32, 539)
    assert k == 69 and 32 * k / 2 >= 1100
    assert audit_plan.default_canaries(2, 100) == 25  # capped at a quarter of the pool


def test_steps_come_in_dependency_order():
    defenses = [{"defend": "base"}, {"defend": "slide_re", "stride": 1, "width": 5}]
    steps = audit_plan.audit_steps("config/digits.json", models=32, group_size=8, defenses=defenses, with_dp=True)
    seen = set()
    for step in steps:
        assert set(step.needs) <= seen, step.name
        assert step.argv[:4] == ["audit.py", step.argv[1], "GPU-ID", "config/digits.json"]
        seen.add(step.name)
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    assert sum(n.startswith("pretrain.g") for n in names) == 4 and sum(n.startswith("prune.dp.g") for n in names) == 4
    by_name = {s.name: s for s in steps}  # dp: tuned as every defense (DP-SGD as corrected)
    assert by_name["tune.base.corrected"].needs == ["prepare"] and by_name["tune.dp"].needs == ["tune.base.corrected"]
    assert by_name["tune.dp"].argv[4:] == ["--defend", "dp", "--semantics", "corrected"]
    assert by_name["prune.dp.g0"].argv[-5:] == ["--defend", "dp", "--semantics", "corrected", "--tuned"]
    assert by_name["prune.dp.g0"].needs == ["memscore", "tune.dp"]
    with_entry = audit_plan.audit_steps(  # dp given as an entry too: one stage, one run
        "config/digits.json", defenses=[{"defend": "dp", "semantics": "corrected", "tuned": True}], with_dp=True
    )
    assert sum(s.name.startswith("tune.") and "dp" in s.name for s in with_entry) == 1


def test_a_bad_defense_spec_is_refused():
    assert audit_plan.parse_defense("slide_re:stride=1,width=5") == {"defend": "slide_re", "stride": "1", "width": "5"}
    with pytest.raises(UsageError, match="is not flag=value"):
        audit_plan.parse_defense("slide_re:stride")
    with pytest.raises(UsageError, match="unknown defense"):
        audit_plan.parse_defense("nodefense")


# ---------------------------------------------------------------- one tiny audit, end to end


def step(name, *flags):
    audit.main([name, "-1", CONFIG, *flags, *TINY])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished tiny audit (M = 4, 8 canaries): pretrained, mem-scores, Base batched and sequential
    (--tag seq), slide_re, their attacks and the summary. Yields its folder."""
    folder = tmp_path_factory.mktemp("audit")
    monkeypatch = pytest.MonkeyPatch()
    as_repo(monkeypatch, folder)
    torch.set_num_threads(1)
    step("prepare", "--models", "4", "--canaries", "8")
    step("pretrain", "--group", "0", "--group_size", "4")
    step("memscore")
    step("attack", "--original", "--bootstrap", "50")
    step("prune", "--group", "0", "--group_size", "4", *PRUNING)
    step("prune", "--group", "0", "--group_size", "4", *PRUNING, "--sequential", "--tag", "seq")
    step("attack", *PRUNING, "--bootstrap", "50")
    for g in (0, 1):
        step("prune", "--group", str(g), "--group_size", "2", *PRUNING, *SLIDE_RE)
    step("attack", *PRUNING, *SLIDE_RE, "--bootstrap", "50")
    step("summarize")
    yield folder
    monkeypatch.undo()


AUDIT = os.path.join("result", "digits_columnfc", "audit")


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


@pytest.mark.slow
def test_a_finished_step_run_again_does_nothing_and_changes_no_file(tiny, capsys):
    before = snapshot(tiny)
    capsys.readouterr()
    step("prepare", "--models", "4", "--canaries", "8")
    step("pretrain", "--group", "0", "--group_size", "4")
    step("memscore")
    step("attack", "--original", "--bootstrap", "50")
    step("prune", "--group", "1", "--group_size", "2", *PRUNING)
    step("prune", "--group", "0", "--group_size", "4", *PRUNING, *SLIDE_RE)
    step("attack", *PRUNING, *SLIDE_RE, "--bootstrap", "50")
    step("summarize")
    said = capsys.readouterr().out
    assert said.count("Nothing to do") == 8, said
    assert snapshot(tiny) == before
    logs = sorted(os.listdir(os.path.join("log", "digits_columnfc", "audit")))
    assert "iter_prunetxt_0.6_slide_re.group0.txt" in logs and "iter_prunetxt_0.6_slide_re.group1.txt" in logs


@pytest.mark.slow
def test_the_plan_file_holds_the_canaries_and_the_halves(tiny):
    plan = audit_plan.Plan.load(os.path.join(AUDIT, "plan.npz"), "")
    from datasets import get_dataset

    train, test = get_dataset("digits")
    rows, labels = audit_plan.insert_canaries(train.y.numpy(), 8, 10, 7)
    assert (plan.audited == rows).all() and (plan.labels == labels).all()
    assert (plan.member == audit_plan.membership(4, len(train), 7)).all()
    assert len(np.intersect1d(plan.dev, plan.test)) == 0 and len(plan.dev) + len(plan.test) == len(test)


@pytest.mark.slow
def test_memscores_are_feldmans_estimate_from_the_pretrained_models(tiny):
    with np.load(os.path.join(AUDIT, "scores", "pretrained.npz")) as z:
        logits, member, labels = z["logits"], z["member"], z["labels"]
    n = member.shape[1]
    correct = logits[:, :n].argmax(2) == labels[None]
    want, _ = audit_plan.feldman_memscores(correct, member)
    got = read_memscores(os.path.join(AUDIT, "memscore.csv"), n, "").numpy()
    assert np.allclose(got, want, atol=1e-12)


@pytest.mark.slow
def test_batched_base_pruning_equals_the_model_by_model_loop(tmp_path, monkeypatch):
    """Base through fit_ensemble (the batched route) against prune_modi.prune_model run on each model with the
    same seeds: the same checkpoints and masks. Long enough (30 pretraining epochs, 3 iterations of 10) that a
    best epoch is not always an iteration's last and the optimizers' state matters. The weights agree to float
    rounding (rtol 1e-5, atol 1e-6): ensemble.py's stacked matrix products add in another order than one model's,
    about 1e-6 after a few epochs (tests/test_ensemble.py); the epochs and dev accuracies must agree exactly."""
    as_repo(monkeypatch, tmp_path)
    long = ["--quiet", "--no_tensorboard", "--batch_size", "64"]
    pruning = ["--pruner_name", "iter_prunetxt", "--prune_iter", "3", "--prune_epochs", "10", "--early_stop", "0"]
    pair = ["--group", "0", "--group_size", "2"]  # models 0 and 1 of the 3 (the fewest a plan may have)
    audit.main(["prepare", "-1", CONFIG, "--models", "3", "--canaries", "8", *long])
    audit.main(["pretrain", "-1", CONFIG, "--group", "0", "--group_size", "3", "--epochs", "30", *long])
    audit.main(["prune", "-1", CONFIG, *pair, "--epochs", "30", *pruning, *long])
    audit.main(["prune", "-1", CONFIG, *pair, "--epochs", "30", *pruning, *long, "--sequential", "--tag", "seq"])
    epochs = []
    for m in range(2):
        folder = os.path.join(AUDIT, "iter_prunetxt_0.6", f"model_{m}")
        batched = torch.load(os.path.join(folder, "best.pth"), weights_only=True)
        alone = torch.load(
            os.path.join(AUDIT, "iter_prunetxt_0.6_tag-seq", f"model_{m}", "best.pth"), weights_only=True
        )
        assert batched["epoch"] == alone["epoch"] and batched["acc"] == alone["acc"]
        for key, value in alone["state"].items():
            torch.testing.assert_close(batched["state"][key], value, rtol=1e-5, atol=1e-6)
        mask = torch.load(os.path.join(folder, "best_mask.pth"), weights_only=True)
        assert (batched["state"]["fc1.weight"][mask["fc1"] == 0] == 0).all()
        epochs.append(batched["epoch"])
    assert min(epochs) < 9  # a best epoch before the last: restoring it or going on from the last differs


@pytest.mark.slow
def test_audit_csv_rows_equal_the_attacks_recomputed_from_the_saved_logits(tiny):
    table = pd.read_csv(os.path.join(AUDIT, "audit.csv"), keep_default_na=False, na_values=[""])
    assert table["defense"].tolist() == ["unpruned", "base", "slide_re"]  # the tagged Base run was not attacked
    plan = audit_plan.Plan.load(os.path.join(AUDIT, "plan.npz"), "")
    for stage, row in zip(("pretrained", "iter_prunetxt_0.6", "iter_prunetxt_0.6_slide_re"), table.to_dict("records")):
        with np.load(os.path.join(AUDIT, "scores", f"{stage}.npz")) as z:
            logits, member, labels = z["logits"], z["member"], z["labels"]
        n = member.shape[1]
        acc = 100 * (logits[:, n:].argmax(2) == _test_labels(plan)[None]).mean(1)
        assert row["test_acc"] == pytest.approx(acc.mean()) and row["test_acc_std"] == pytest.approx(acc.std(ddof=1))
        scores = {
            "LiRA": loo_attacks.lira_online_loo(logits[:, :n], labels, member),
            "RMIA": loo_attacks.rmia_loo(
                logits,
                np.concatenate([labels, _test_labels(plan)]),
                np.concatenate([member, np.zeros((4, len(plan.test)), bool)], 1),
                gamma=1.0,
            )[:, :n],
        }
        for attack, s in scores.items():
            for subset, rows in (("audited", plan.audited), ("all", np.arange(n))):
                found = loo_attacks.audit_metrics(s, member, rows, resamples=50, seed=7)
                for metric, short in (("AUC", "auc"), ("TPR@1%FPR", "tpr1"), ("TPR@0.1%FPR", "tpr01")):
                    key = f"{attack}_{subset}_{short}"
                    assert [row[key], row[key + "_lo"], row[key + "_hi"]] == pytest.approx(list(found[metric]))
                assert row[f"{subset}_nonmembers"] == int((~member[:, rows]).sum())
    assert not measurable("TPR@1%FPR", int(table["audited_nonmembers"][0]))  # 4 models x 8 canaries: far too few
    assert "n/m" in audit_report.markdown_table(table)


@pytest.mark.slow
def test_audit_csv_pairs_each_row_with_base_on_the_saved_scores(tiny):
    table = pd.read_csv(os.path.join(AUDIT, "audit.csv"), keep_default_na=False, na_values=[""])
    rows = dict(zip(table["stage"], table.to_dict("records")))
    assert all(np.isnan(v) for k, v in rows["iter_prunetxt_0.6"].items() if "_vs_base" in k)  # Base's own row
    with np.load(os.path.join(AUDIT, "scores", "iter_prunetxt_0.6.npz")) as z:
        base = {a: z[f"score_{a}"] for a in ("LiRA", "RMIA")}
    for stage in ("pretrained", "iter_prunetxt_0.6_slide_re"):
        with np.load(os.path.join(AUDIT, "scores", f"{stage}.npz")) as z:
            for attack in ("LiRA", "RMIA"):
                for subset, subset_rows in (("audited", z["audited"]), ("all", None)):
                    found = loo_attacks.paired_difference(
                        z[f"score_{attack}"], base[attack], z["member"], subset_rows, resamples=50, seed=7
                    )
                    for metric, short in (("AUC", "auc"), ("TPR@1%FPR", "tpr1")):
                        key = f"{attack}_{subset}_{short}_vs_base"
                        got = [rows[stage][key], rows[stage][key + "_lo"], rows[stage][key + "_hi"]]
                        assert got == pytest.approx(list(found[metric]), nan_ok=True)
                        unpaired = (
                            rows[stage][f"{attack}_{subset}_{short}"]
                            - rows["iter_prunetxt_0.6"][f"{attack}_{subset}_{short}"]
                        )
                        assert rows[stage][key] == pytest.approx(unpaired)  # the point: the plain difference
    assert "defense minus Base (paired)" in audit_report.paired_markdown(table)


def _test_labels(plan):
    from datasets import get_dataset

    return get_dataset("digits")[1].y.numpy()[plan.test - plan.n]


@pytest.mark.slow
def test_pruning_with_other_settings_under_the_same_name_is_refused(tiny):
    with pytest.raises(UsageError, match="other settings"):
        step(
            "prune",
            "--group",
            "0",
            "--group_size",
            "4",
            *PRUNING,
            "--defend",
            "slide_re",
            "--stride",
            "2",
            "--width",
            "5",
        )


@pytest.mark.slow
def test_refusals_are_one_error_line(tiny):
    def refused(*flags, code):
        proc = run_script("audit.py", *flags, *TINY, cwd=tiny, check=False, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        return lines[0]

    before = snapshot(tiny)
    assert "do not fit the pool of 539" in refused(
        "prepare", "-1", CONFIG, "--canaries", "540", "--audit_tag", "x", code=2
    )
    assert "--models must be >= 3" in refused("prepare", "-1", CONFIG, "--models", "1", "--audit_tag", "x", code=2)
    line = refused("attack", "-1", CONFIG, *PRUNING, "--defend", "ml2", "--mem_thre", "0.3", code=1)
    assert "4 of 4 models are not finished" in line and "audit.py prune" in line and "--group G" in line
    line = refused("prune", "-1", CONFIG, "--group", "0", *PRUNING, "--defend", "dp", code=2)
    assert "--defend dp needs its noise multiplier: --defend_arg SIGMA, or --tuned" in line
    assert "audit.py tune_dp is retired" in refused("tune_dp", "-1", CONFIG, code=2)
    assert "--group 9 holds no model" in refused("pretrain", "-1", CONFIG, "--group", "9", code=2)
    line = refused("prepare", "-1", CONFIG, "--models", "8", code=2)
    assert "exists with other options" in line
    assert "unknown step" in refused("nostep", "-1", CONFIG, code=2)
    assert snapshot(tiny) == before  # nothing written, nothing lost


@pytest.mark.slow
def test_attack_before_pretraining_names_the_groups_to_run(tmp_path, monkeypatch):
    as_repo(monkeypatch, tmp_path)
    step("prepare", "--models", "4", "--canaries", "8")
    with pytest.raises(MissingError, match=r"audit.py pretrain .*--group G --group_size 8.* for G in 0"):
        step("attack", "--original")
