"""audit.py tune on a tiny digits audit (3 planned models, none of them ever trained; 4 tuning models of 2 epochs;
2 pruning iterations of 2 epochs): it opens no audited model, its draws are disjoint from the audit's, its trials
share one resumable study, and the chosen setting is the selection rule's on its trials."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import audit
import search_space
from auditing import plan as audit_plan
from auditing import report as audit_report
from auditing import tune as audit_tune
from auditing import tuning
from common import MissingError, UsageError
from conftest import REPO, as_repo
from helpers import DIGITS

AUDIT = os.path.join("result", "digits_columnfc", "audit")
TINY = ["--epochs", "2", "--quiet", "--no_tensorboard", "--batch_size", "64"]
PRUNING = ["--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "2"]
TUNE = ["--defend", "slide_re", "--tuning_models", "4", *PRUNING, *TINY]
STUDY = "iter_prunetxt_0.6_slide_re_i2e2_k4"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as monkeypatch:
        as_repo(monkeypatch, folder)
        audit.main(["prepare", "-1", DIGITS, "--models", "3", *TINY])
        audit.main(["tune", "-1", DIGITS, "--trials", "3", *TUNE])
        with open(os.path.join(AUDIT, "tuning", f"{STUDY}.json")) as f:
            first = json.load(f)
        audit.main(["tune", "-1", DIGITS, "--trials", "3", *TUNE])  # the study holds 3: no trial runs
        with open(os.path.join(AUDIT, "tuning", f"{STUDY}.json")) as f:
            again = json.load(f)
        audit.main(["tune", "-1", DIGITS, "--trials", "4", *TUNE])  # resumed: one more
        with open(os.path.join(AUDIT, "tuning", f"{STUDY}.json")) as f:
            resumed = json.load(f)
        log = open(os.path.join("log", "digits_columnfc", "audit", f"tune_{STUDY}.txt")).read().splitlines()
        plan = audit_plan.Plan.load(os.path.join(AUDIT, "plan.npz"), "")
        audited = sorted(os.listdir(AUDIT))
        # the audited models, then the tuned setting pruned and attacked on them
        audit.main(["pretrain", "-1", DIGITS, "--group", "0", "--group_size", "3", *TINY])
        audit.main(["memscore", "-1", DIGITS, *TINY])
        tuned_flags = ["--defend", "slide_re", "--tuned", "--tuning_models", "4", *PRUNING, *TINY]
        audit.main(["prune", "-1", DIGITS, "--group", "0", "--group_size", "3", *tuned_flags])
        audit.main(["attack", "-1", DIGITS, "--bootstrap", "0", *tuned_flags])
        for sparsity in ("0.6", "0.0"):  # Base, and the fine-tuning control
            base = [*PRUNING, "--prune_sparsity", sparsity, *TINY]
            audit.main(["prune", "-1", DIGITS, "--group", "0", "--group_size", "3", "--defend", "base", *base])
            audit.main(["attack", "-1", DIGITS, "--bootstrap", "20", "--defend", "base", *base])
        audit.main(["summarize", "-1", DIGITS, *TINY])
        yield folder, first, again, resumed, log, plan, audited


@pytest.mark.slow  # trains tuning models
def test_the_tuner_opens_no_audited_model_and_its_draws_are_disjoint(tuned):
    folder, first, _, _, _, plan, audited = tuned
    assert audited == ["plan.npz", "tuning"]  # tuned before any audited model existed
    assert sorted(os.listdir(folder / AUDIT / "tuning" / "pretrained")) == [f"model_{j}" for j in range(4)]
    tuning_member = audit_plan.membership(4, plan.n, 7, "tuning")
    assert not any(np.array_equal(t, a) for t in tuning_member for a in plan.member)
    seeds = lambda offset, count: {audit_plan.model_seed(7, "init", offset + m) for m in range(count)}
    assert not seeds(audit_plan.TUNING_OFFSET, 4) & seeds(0, plan.models)
    assert first["plan_sha256"] and first["tuning_models"] == 4


@pytest.mark.slow  # trains tuning models
def test_the_chosen_setting_is_the_rules_on_the_trials_and_the_base_reference_sets_the_target(tuned):
    _, first, _, _, log, plan, _ = tuned
    trials = first["trials"]
    assert len(trials) == 3 and first["leak_metric"] == "AUC"  # 4 models x 134 canaries: too few for TPR@1%FPR
    assert first["target_acc"] == pytest.approx(first["reference"]["acc"] - 1)
    chosen, within = tuning.choose(trials, first["target_acc"], 1.0)
    assert first["chosen"]["number"] == chosen["number"] and first["within_tolerance"] == within
    assert set(first["chosen"]["values"]) == {"stride", "width"}
    assert all(isinstance(v, int) and v >= 1 for v in first["chosen"]["flags"].values())
    outs = int((~audit_plan.membership(4, plan.n, 7, "tuning")[:, plan.audited]).sum())
    assert outs < 1000 and log[1] == f"Leakage: LiRA AUC on the audited rows ({outs} non-member decisions)"
    ref = first["reference"]
    assert log[2] == f"Base reference: dev accuracy {ref['acc']:.3f}, LiRA AUC {ref['leak']:.3f}"
    assert sum(line.startswith("trial stride ") for line in log) == 4  # 3 trials, then the resumed study's 4th


@pytest.mark.slow  # trains tuning models
def test_the_study_resumes_without_running_or_counting_a_trial_twice(tuned):
    _, first, again, resumed, _, _, _ = tuned
    assert again["trials"] == first["trials"]
    assert resumed["trials"][:3] == first["trials"] and len(resumed["trials"]) == 4
    assert len({json.dumps(t["values"], sort_keys=True) for t in resumed["trials"]}) == 4


@pytest.mark.slow  # trains tuning models
def test_tune_base_trains_the_tuning_models_and_measures_the_base_reference_only(tmp_path, monkeypatch):
    as_repo(monkeypatch, tmp_path)
    audit.main(["prepare", "-1", DIGITS, "--models", "3", *TINY])
    audit.main(["tune", "-1", DIGITS, "--defend", "base", "--tuning_models", "4", *PRUNING, *TINY])
    assert sorted(os.listdir(tmp_path / AUDIT / "tuning")) == [
        "base_iter_prunetxt_0.6_i2e2_k4_release.json",
        "pretrained",
    ]
    with open(tmp_path / AUDIT / "tuning" / "base_iter_prunetxt_0.6_i2e2_k4_release.json") as f:
        reference = json.load(f)
    assert reference["schedule"]["semantics"] == "release" and 0 < reference["acc"] <= 100


@pytest.mark.slow  # trains tuning models
def test_the_audited_run_of_the_tuned_setting_resolves_it_on_the_audits_data_and_is_tagged(tuned):
    """prune/attack --tuned: the chosen shares of the smallest class, resolved on model 0's training set of the
    audit (as auto is), in a stage of its own (<prefix>_tag-tuned) whose models and record hold those flags."""
    folder, _, _, resumed, _, plan, _ = tuned
    stage = "iter_prunetxt_0.6_slide_re_tag-tuned"
    sizes = [c for c in np.bincount(plan.labels[: plan.n][plan.member[0]]) if c]
    expected = search_space.flags_of(
        audit_tune.get_defense("slide_re").search_space, resumed["chosen"]["values"], sizes
    )
    with open(folder / AUDIT / stage / "model_0" / "complete.json") as f:
        settings = json.load(f)["settings"]
    assert {k: settings[k] for k in ("stride", "width")} == expected
    with open(folder / AUDIT / "records" / f"{stage}.json") as f:
        record = json.load(f)
    assert record["stage"] == stage and {k: record["settings"][k] for k in expected} == expected
    assert record["tuned"]["chosen"] == resumed["chosen"] and record["tuned"]["trials"] == resumed["trials"]
    text = (folder / AUDIT / "audit.md").read_text()
    assert "| defense minus Base (paired) |" in text and "best baseline" not in text  # no baseline audited


def test_all_runs_a_tune_step_before_a_tuned_defenses_prunes():
    entry = audit_plan.parse_defense("slide_re:tuned")
    assert entry == {"defend": "slide_re", "tuned": True}
    steps = audit_plan.audit_steps(
        "CONFIG", models=3, group_size=3, defenses=[entry], pruning=PRUNING, tune=["--trials", "5"]
    )
    by_name = {s.name: s for s in steps}
    tune = by_name["tune.0.slide_re_tuned"]
    assert tune.argv == ["audit.py", "tune", "GPU-ID", "CONFIG", "--defend", "slide_re", *PRUNING, "--trials", "5"]
    assert tune.needs == ["tune.base"] and by_name["tune.base"].needs == ["prepare"]
    assert by_name["tune.base"].argv[4:6] == ["--defend", "base"]
    assert by_name["prune.0.slide_re_tuned.g0"].needs == ["memscore", "tune.0.slide_re_tuned"]
    assert "--tuned" in by_name["attack.0.slide_re_tuned"].argv
    with pytest.raises(UsageError, match="or 'tuned' \\(a defense with a search space\\)"):
        audit_plan.parse_defense("base:tuned")


@pytest.mark.slow  # trains tuning models
def test_the_control_is_base_at_sparsity_0_labelled_beside_base_and_paired_with_it(tuned):
    """The audit table: the control before Base (ordered), named as the control, compared with Base on the same
    decisions; Base itself has no difference; the tuned stage is a defense row of its own."""
    folder = tuned[0]
    table = pd.read_csv(folder / AUDIT / "audit.csv")
    assert list(table["stage"]) == [
        "iter_prunetxt_0.0",
        "iter_prunetxt_0.6",
        "iter_prunetxt_0.6_slide_re_tag-tuned",
    ]
    assert list(table["setting"].fillna("")[:2]) == ["sparsity 0: fine-tuned, not pruned", ""]
    assert np.isfinite(table["LiRA_audited_auc_vs_base"][0]) and np.isnan(table["LiRA_audited_auc_vs_base"][1])
    with open(folder / AUDIT / "records" / "iter_prunetxt_0.0.json") as f:
        record = json.load(f)
    assert record["pruning"]["prune_sparsity"] == 0.0 and record["defense"] == "base"
    steps = audit_plan.audit_steps("CONFIG", models=3, group_size=3, pruning=PRUNING, control=True)
    control = {s.name: s for s in steps}["prune.control.g0"]
    assert control.argv[-4:] == ["--defend", "base", "--prune_sparsity", "0.0"]  # after the pruning flags: it wins


def synthetic_table():
    """Three audited rows (Base, a tuned slide_re below its target, ppb) with every column draw_plane reads."""
    rows = []
    for name, acc, tpr, tuned in (
        ("base", 90.0, 70.0, False),
        ("slide_re", 85.0, 30.0, True),
        ("ppb", 88.0, 50.0, False),
    ):
        row = {"defense": name, "setting": "", "test_acc": acc, "test_acc_std": 1.0, "audited_nonmembers": 2000}
        for attack, shift in (("LiRA", 0.0), ("RMIA", -5.0)):
            for short in ("tpr1", "tpr01", "auc"):
                value = tpr + shift if short != "auc" else 0.9
                row.update({f"{attack}_audited_{short}": value, f"{attack}_audited_{short}_lo": value - 4})
                row[f"{attack}_audited_{short}_hi"] = value + 6
        row.update(audit_report.target_columns({"tuned": {"target_acc": 88.0, "tolerance": 1.0}} if tuned else {}, acc))
        rows.append(row)
    return pd.DataFrame(rows)


def test_the_plane_draws_the_tables_numbers_and_the_tuning_trials_front_and_choice():
    import matplotlib.pyplot as plt

    table = synthetic_table()
    trials = [
        {"number": 0, "acc": 86.0, "leak": 0.9, "values": {}},
        {"number": 1, "acc": 88.0, "leak": 0.95, "values": {}},
        {"number": 2, "acc": 85.0, "leak": 0.97, "values": {}},  # dominated by 0
    ]
    tuned = {"leak_metric": "AUC", "trials": trials, "chosen": trials[1], "target_acc": 88.0, "tolerance": 1.0}
    tuned["reference"] = {"acc": 89.0, "leak": 0.98}
    fig = audit_report.draw_plane(table, [("slide_re", tuned)])
    tuning_ax, tpr1_ax = fig.axes[:2]  # 2000 non-member decisions: TPR@1%FPR is measurable, TPR@0.1%FPR is not
    assert "TPR@0.1%FPR n/m: 2000 non-member decisions" in tpr1_ax.get_title() and len(fig.axes) == 2
    faint, star, base = tuning_ax.collections
    assert faint.get_offsets().tolist() == [[86.0, 0.9], [88.0, 0.95], [85.0, 0.97]]
    assert star.get_offsets().tolist() == [[88.0, 0.95]] and base.get_offsets().tolist() == [[89.0, 0.98]]
    front_line, target = tuning_ax.get_lines()
    assert list(front_line.get_xdata()) == [86.0, 88.0] and list(front_line.get_ydata()) == [0.9, 0.95]
    assert list(target.get_xdata()) == [87.0, 87.0]
    assert front_line.get_color() == "C1"  # slide_re's colour, as on the audited panel
    points = [line for line in tpr1_ax.get_lines() if line.get_marker() in ("o", "D")]  # not the caps
    drawn = [(p.get_xdata()[0], p.get_ydata()[0], p.get_color()) for p in points]
    assert drawn == list(zip(table["test_acc"], table["LiRA_audited_tpr1"], ["black", "C1", "C6"]))
    plt.close(fig)
    assert list(table["misses_target"]) == [False, True, False]  # 85 < 88 - 1
    assert "**below the tuning target 87.0**" in audit_report.table_label(table.iloc[1])


def test_the_best_baseline_is_the_least_leaking_of_the_papers_baselines():
    table = synthetic_table()
    records = [{"defense": d, "stage": d} for d in table["defense"]]
    assert audit_report.best_baseline(table, records) is records[2]  # ppb: the only baseline
    table.loc[2, "defense"], records[2]["defense"] = "slide_re", "slide_re"
    assert audit_report.best_baseline(table, records) is None
    table = pd.concat([synthetic_table(), synthetic_table().iloc[[2]].assign(defense="dp", LiRA_audited_tpr1=40.0)])
    records = [{"defense": d, "stage": str(i)} for i, d in enumerate(table["defense"])]
    assert audit_report.best_baseline(table, records)["defense"] == "dp"  # 40 < ppb's 50
    table["misses_target"] = [False, True, False, True]  # dp below its tuning target: not at the matched utility
    assert audit_report.best_baseline(table, records)["defense"] == "ppb"


def test_compare_puts_the_seeds_side_by_side_and_counts_the_seeds_whose_interval_excludes_0(tmp_path, monkeypatch):
    """Two seeds' audit.csv: slide_re's paired interval against Base lies below 0 in seed 7 only, ppb's in both;
    compare.md gives each seed's LiRA TPR@1%FPR, mean ± std, and those counts."""
    as_repo(monkeypatch, tmp_path)
    for seed, folder, slide_hi in ((7, "digits_columnfc", -2.0), (8, "digits_columnfc_seed8", 1.5)):
        table = synthetic_table().assign(stage=["base", "slide_re_tag-tuned", f"ppb_{seed / 3:.3g}_tag-tuned"])
        table["LiRA_audited_tpr1"] += seed - 7
        table["LiRA_audited_tpr1_vs_base_hi"] = [np.nan, slide_hi, -3.0]
        table["LiRA_audited_tpr1_vs_baseline_hi"] = [5.0, 2.0, np.nan]
        os.makedirs(tmp_path / "result" / folder / "audit")
        table.to_csv(tmp_path / "result" / folder / "audit" / "audit.csv", index=False)
    audit.main(["compare", "-1", DIGITS, "--seeds", "7,8"])
    lines = (tmp_path / AUDIT / "compare.md").read_text().splitlines()
    assert lines[0] == (
        "| defense | test acc (%) | LiRA TPR@1%FPR (%), seed 7 | LiRA TPR@1%FPR (%), seed 8 | LiRA TPR@1%FPR (%), "
        "mean ± std | lower than Base (seeds) | lower than the best baseline (seeds) |"
    )
    assert lines[2] == "| base | 90.0 ± 0.0 | 70.0 | 71.0 | 70.5 ± 0.7 | 0 of 2 | 0 of 2 |"
    assert lines[3].endswith("| 30.0 | 31.0 | 30.5 ± 0.7 | 1 of 2 | 0 of 2 |")
    assert lines[3].startswith("| slide_re (tuned) |")  # the tuned ppb is one row though its name has its seed's
    assert lines[4] == "| ppb (tuned) | 88.0 ± 0.0 | 50.0 | 51.0 | 50.5 ± 0.7 | 2 of 2 | 0 of 2 |"
    with pytest.raises(UsageError, match="--seeds must list two or more seeds"):
        audit.main(["compare", "-1", DIGITS, "--seeds", "7"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tune", "--defend", "slide_re", "--trials", "0"], "--trials must be >= 1, got 0"),
        (
            ["prune", "--group", "0", "--defend", "base", "--tuned"],
            "--tuned reads the setting audit.py tune chose; --defend base",
        ),
        (["all", "--control", "--prune_sparsity", "0"], "--control adds Base at sparsity 0, which --prune_sparsity 0"),
        (["all", "--defense", "slide_re:tuned,stride=2"], "'stride' is what tuned chooses; give one of them, not both"),
    ],
)
def test_tuning_flags_that_cannot_work_are_refused(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        args = audit.get_args([argv[0], "-1", DIGITS, *PRUNING, *argv[1:]])
        if argv[0] == "all":
            [audit_plan.parse_defense(d) for d in args.defense or []]


@pytest.mark.slow  # trains tuning models
def test_a_study_of_another_plan_or_settings_is_refused(tmp_path, monkeypatch):
    """The study holds the plan, the run and the settings it was started with; tune refuses to add trials made
    with others to it (here: another --early_stop), naming the study and the fix."""
    as_repo(monkeypatch, tmp_path)
    audit.main(["prepare", "-1", DIGITS, "--models", "3", *TINY])
    before = "runs trials on the tuning models, which are not all pretrained; run python audit.py tune -1 "
    with pytest.raises(MissingError, match=rf"--worker 1/2 {before}.* --defend base .*--tuning_models 4 first"):
        audit.main(["tune", "-1", DIGITS, "--trials", "1", *TUNE, "--worker", "1/2"])  # W workers would train them
    audit.main(["tune", "-1", DIGITS, "--trials", "1", *TUNE])
    with pytest.raises(UsageError, match="--worker runs a defense's trials; --defend base has no search space"):
        audit.main(["tune", "-1", DIGITS, *TUNE, "--defend", "base", "--worker", "1/2"])
    with pytest.raises(UsageError, match=rf"the study {STUDY} in .* holds trials of another tuned for; pass another"):
        audit.main(["tune", "-1", DIGITS, "--trials", "2", *TUNE, "--early_stop", "3"])


@pytest.mark.slow  # trains tuning models
def test_two_workers_tune_one_study_at_once_each_with_its_log_and_the_chooser_writes_the_choice(tuned):
    """tune --worker 1/2 and 2/2 at once (processes of their own) run 2 + 1 of 3 trials on one study, each logging its
    own trials and choosing nothing; tune without --worker then runs none and writes the chosen setting."""
    folder = tuned[0]
    ppb = ["--defend", "ppb", "--tuning_models", "4", "--trials", "3", *PRUNING, *TINY]
    stage = "iter_prunetxt_0.6_ppb_i2e2_k4"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    command = lambda k: [
        sys.executable,
        os.path.join(REPO, "audit.py"),
        "tune",
        "-1",
        DIGITS,
        *ppb,
        "--worker",
        f"{k}/2",
    ]
    workers = [subprocess.Popen(command(k), cwd=folder, env=env, stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0], [w.stderr.read()[-2000:] for w in workers]
    tuning_dir = folder / AUDIT / "tuning"
    assert not (tuning_dir / f"{stage}.json").exists()  # the workers choose nothing
    logs = {
        k: (folder / "log" / "digits_columnfc" / "audit" / f"tune_{stage}.w{k}of2.txt").read_text().splitlines()
        for k in (1, 2)
    }
    assert [sum(line.startswith("trial defend_arg ") for line in logs[k]) for k in (1, 2)] == [2, 1]
    assert logs[1][0].endswith("; worker 1/2: 2 of them") and logs[2][0].endswith("; worker 2/2: 1 of them")
    assert logs[1][-1].startswith("Worker 1/2 ran 2 trials; the study holds ")
    with pytest.MonkeyPatch.context() as monkeypatch:
        as_repo(monkeypatch, folder)
        audit.main(["tune", "-1", DIGITS, *ppb])
    with open(tuning_dir / f"{stage}.json") as f:
        chosen = json.load(f)
    log = (folder / "log" / "digits_columnfc" / "audit" / f"tune_{stage}.txt").read_text().splitlines()
    assert len(chosen["trials"]) == 3 and not any(line.startswith("trial ") for line in log)  # it ran none
    values = {json.dumps(t["values"]) for t in chosen["trials"]}
    assert len(values) == 3  # no setting drawn twice
    assert chosen["chosen"]["number"] == tuning.choose(chosen["trials"], chosen["target_acc"], 1.0)[0]["number"]
