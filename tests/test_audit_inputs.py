"""What the audit does with inputs it cannot use: too few models for the attacks (refused; an older plan warned
of), a broken file one step wrote and a later one reads (one error line naming it and the command that
rebuilds it; the attack redoes a stage whose scores file is not the one it wrote), and the dp row's ε range.
One small audit (M = 3, the fewest, 2 epochs: pretrained and dp-pruned, both attacked) is built once; each
test breaks a copy of it."""

import hashlib
import json
import os
import shlex

import numpy as np
import pandas as pd
import pytest
import torch

import audit
from auditing import report as audit_report
from conftest import REPO, as_repo
from helpers import copy_run, run_forked

CONFIG = os.path.join(REPO, "config", "digits.json")
TINY = ["--epochs", "2", "--quiet", "--no_tensorboard", "--batch_size", "64"]
PRUNING = ["--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "2"]
DP = ["--defend", "dp", "--defend_arg", "1", "--semantics", "corrected"]
AUDIT = os.path.join("result", "digits_columnfc", "audit")
DP_STAGE = "iter_prunetxt_0.6_dp_1.0_corrected"
PRETRAINED_ATTACK = ["--original", "--bootstrap", "20", *TINY]


def step(name, *flags):
    audit.main([name, "-1", CONFIG, *flags, *TINY])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A finished audit of 3 models and 8 canaries: pretrained, mem-scores, dp-pruned, both stages attacked,
    summarized. Yields its folder."""
    folder = tmp_path_factory.mktemp("audit_inputs")
    monkeypatch = pytest.MonkeyPatch()
    as_repo(monkeypatch, folder)
    torch.set_num_threads(1)
    step("prepare", "--models", "3", "--canaries", "8")
    step("pretrain", "--group", "0", "--group_size", "3")
    step("memscore")
    audit.main(["attack", "-1", CONFIG, *PRETRAINED_ATTACK])
    step("prune", "--group", "0", "--group_size", "3", *PRUNING, *DP)
    step("attack", *PRUNING, *DP, "--bootstrap", "20")
    step("summarize")
    yield folder
    monkeypatch.undo()


def audit_py(*args, cwd):
    """audit.py args run as a script in cwd: (exit status, stdout, the non-empty lines of stderr)."""
    proc = run_forked("audit.py", *args, cwd=cwd)
    return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if line.strip()]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------- too few models


@pytest.mark.parametrize("command", ["prepare", "all"])
def test_two_models_are_refused_because_no_row_would_have_both_references(tmp_path, command):
    code, _, lines = audit_py(command, "-1", CONFIG, "--models", "2", cwd=tmp_path)
    assert code == 2 and lines == [
        "error: --models must be >= 3, got 2: leave-one-out LiRA scores a row on a target model from an IN and an "
        "OUT reference among the other M - 1 models, so it needs M - 1 >= 2 (with 2 models every LiRA score is 0 "
        "and its AUC 0.5); RMIA needs 1 other model"
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_the_attack_warns_of_the_pairs_lira_cannot_score(small, tmp_path):
    """With 3 models about half the (row, target) pairs have both references among the other two: the attack
    counts the rest, which a literal loop over the plan counts too, and LiRA scores exactly those 0."""
    folder = copy_run(small, tmp_path)
    os.remove(os.path.join(folder, AUDIT, "records", "pretrained.json"))
    code, _, lines = audit_py("attack", "-1", CONFIG, *PRETRAINED_ATTACK, cwd=folder)
    with np.load(os.path.join(folder, AUDIT, "plan.npz")) as z:
        member = z["member"]
    unscored = np.zeros(member.shape, dtype=bool)
    for m in range(3):
        for n in range(member.shape[1]):
            others = {bool(member[k, n]) for k in range(3) if k != m}
            unscored[m, n] = others != {True, False}
    assert code == 0 and lines == [
        f"warning: {unscored.sum()}/{member.size} (row, target) pairs have no IN or no OUT reference among the other "
        "2 models, and LiRA scores them 0 (no information); prepare an audit with more --models (about 2^-(M-2) of "
        "the pairs lack one)"
    ]
    assert 0.4 < unscored.mean() < 0.6
    with np.load(os.path.join(folder, AUDIT, "scores", "pretrained.npz")) as z:
        lira = z["score_LiRA"]
    assert (lira[unscored] == 0).all() and (lira[~unscored] != 0).all()


# ---------------------------------------------------------------- broken files


@pytest.mark.slow
def test_a_truncated_scores_file_names_itself_and_the_attack_that_rebuilds_it(small, tmp_path):
    folder = copy_run(small, tmp_path)
    scores = os.path.join(AUDIT, "scores", "pretrained.npz")
    written, table = sha256(os.path.join(folder, scores)), sha256(os.path.join(folder, AUDIT, "audit.csv"))
    with open(os.path.join(folder, scores), "r+b") as f:
        f.truncate(1000)
    code, _, lines = audit_py("summarize", "-1", CONFIG, *TINY, cwd=folder)
    rebuild = shlex.join(["python", "audit.py", "attack", "-1", CONFIG, *PRETRAINED_ATTACK])
    assert code == 1 and lines == [
        f"error: {scores} (the audit scores of stage pretrained): not the file its attack wrote (SHA-256 differs "
        f"from {AUDIT}/records/pretrained.json's); rebuild it with: {rebuild}"
    ]
    code, out, lines = audit_py(*shlex.split(rebuild)[2:], cwd=folder)  # the command the line gives
    assert code == 0 and "Nothing to do" not in out, out
    assert f"Attacking pretrained again: its scores file {scores} is not the file the attack wrote" in out
    assert sha256(os.path.join(folder, scores)) == written  # the same models give the same file
    code, out, _ = audit_py("summarize", "-1", CONFIG, *TINY, cwd=folder)
    assert code == 0 and sha256(os.path.join(folder, AUDIT, "audit.csv")) == table


@pytest.mark.slow
def test_a_lost_scores_file_is_attacked_again_not_skipped(small, tmp_path):
    folder = copy_run(small, tmp_path)
    scores = os.path.join(AUDIT, "scores", f"{DP_STAGE}.npz")
    written = sha256(os.path.join(folder, scores))
    os.remove(os.path.join(folder, scores))
    code, out, _ = audit_py("attack", "-1", CONFIG, *PRUNING, *DP, "--bootstrap", "20", *TINY, cwd=folder)
    assert code == 0 and f"Attacking {DP_STAGE} again: its scores file {scores} is missing" in out, out
    assert sha256(os.path.join(folder, scores)) == written
    code, out, _ = audit_py("attack", "-1", CONFIG, *PRUNING, *DP, "--bootstrap", "20", *TINY, cwd=folder)
    assert code == 0 and "Nothing to do" in out


def corrupt(path):
    """A zip (.npz) cut short; any other file (a chosen setting, which this audit has not tuned, too) a JSON object
    cut short."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".npz"):
        with open(path, "r+b") as f:
            f.truncate(1000)
    else:
        with open(path, "wb") as f:
            f.write(b'{"noise": 1.0')


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken, command, line",
    [
        (
            "records/pretrained.json",
            ["summarize"],
            "{path} (the attack record of stage pretrained): unreadable (JSONDecodeError: Expecting ',' delimiter: "
            "line 1 column 14 (char 13)); rebuild it with: python audit.py attack -1 {config} --original",
        ),
        (
            "plan.npz",
            ["summarize"],
            "{path} (the audit plan): unreadable (BadZipFile: File is not a zip file); delete it and rebuild it "
            "with: python audit.py prepare -1 {config} --models M and the --canaries K or --audit_top_memscore K it "
            "was made with (the same options make the same file)",
        ),
        (
            "memscore.csv",
            ["summarize"],
            "{path} (the audit's mem-scores): not the file the memscore step wrote (SHA-256 differs from "
            "{audit}/memscore.json's); rebuild it with: python audit.py memscore -1 {config}",
        ),
        (
            "memscore.json",
            ["prune", "--group", "0", *PRUNING, "--defend", "ml2", "--mem_thre", "0.3"],
            "{path} (the audit's mem-score fingerprint): missing or unreadable; rebuild it with: "
            "python audit.py memscore -1 {config}",
        ),
        (
            "tuning/iter_prunetxt_0.6_dp_corrected_i2e2_k16.json",
            ["prune", "--group", "0", *PRUNING, "--defend", "dp", "--semantics", "corrected", "--tuned"],
            "{path} (the chosen setting): unreadable (JSONDecodeError: Expecting ',' delimiter: line 1 column 14 "
            "(char 13)); rebuild it with: python audit.py tune -1 {config} --defend dp --pruner_name iter_prunetxt "
            "--prune_sparsity 0.6 --prune_iter 2 --prune_epochs 2 --tuning_models 16",
        ),
    ],
)
def test_an_unreadable_file_is_one_error_line_with_the_step_that_rebuilds_it(small, tmp_path, broken, command, line):
    folder = copy_run(small, tmp_path)
    corrupt(os.path.join(folder, AUDIT, broken))
    code, _, lines = audit_py(command[0], "-1", CONFIG, *command[1:], *TINY, cwd=folder)
    want = line.format(path=os.path.join(AUDIT, broken), audit=AUDIT, config=shlex.quote(CONFIG))
    assert code == 1 and lines == [f"error: {want}"]


@pytest.mark.slow
def test_the_attack_redoes_a_stage_whose_record_is_unreadable(small, tmp_path):
    folder = copy_run(small, tmp_path)
    record = os.path.join(AUDIT, "records", "pretrained.json")
    corrupt(os.path.join(folder, record))
    code, out, _ = audit_py("attack", "-1", CONFIG, *PRETRAINED_ATTACK, cwd=folder)
    assert code == 0 and f"Attacking pretrained again: its record {record} is unreadable (JSONDecodeError" in out
    with open(os.path.join(folder, record)) as f:
        assert json.load(f)["flags"] == PRETRAINED_ATTACK


# ---------------------------------------------------------------- the dp row's epsilon


@pytest.mark.slow
def test_the_dp_row_holds_the_range_of_its_models_epsilons(small):
    epsilons = []
    for m in range(3):
        with open(os.path.join(small, AUDIT, DP_STAGE, f"model_{m}", "complete.json")) as f:
            epsilons.append(float(json.load(f)["dp_epsilon"]))
    table = pd.read_csv(os.path.join(small, AUDIT, "audit.csv"), keep_default_na=False, na_values=[""])
    rows = dict(zip(table["defense"], table.to_dict("records")))
    dp, unpruned = rows["dp"], rows["unpruned"]
    want = [min(epsilons), float(np.median(epsilons)), max(epsilons)]
    assert [dp["dp_epsilon_min"], dp["dp_epsilon_median"], dp["dp_epsilon_max"]] == pytest.approx(want)
    assert all(np.isfinite(want)) and all(np.isnan(unpruned[f"dp_epsilon_{k}"]) for k in ("min", "median", "max"))
    assert "dp_epsilon" not in table.columns
    markdown = audit_report.markdown_table(table)
    assert f"| dp (noise 1, ε {min(epsilons):.1f}-{max(epsilons):.1f}) |" in markdown
    assert "for the dp fine-tuning only; the pretraining on the same rows is not private." in markdown
