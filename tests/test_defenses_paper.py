"""The paper's defenses: RSW windows (slide, slide_re, random), RMR (ml2) and SWMR (slide_ml2,
slide_re_ml2), on a hand-made set, plus an end-to-end digits run of all six."""

import copy
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

import defenses
import memscores
import prune_modi
import train
from common import UsageError
from conftest import REPO
from datasets import TensorData
from defenses import DEFENSES, ML2, DefenseSettings, RandomWindow, RiskMemory, Slide, SlideML2, SlideRe, SlideReML2
from helpers import attack_cmd, one_row, pretrain_cmd, prune_cmd, run_scripts
from models import build_model
from records import find_records
from reporting import results
from splits import ModelSplit, make_split

# Twelve samples, three classes. Class 1 has only two samples, so it runs out before the others.
#            0    1    2    3    4    5    6    7    8    9    10   11
SCORES = [0.9, 0.1, 0.5, 0.2, 0.8, 0.4, 0.7, 0.3, 0.6, 0.0, 0.2, 1.0]
LABELS = [0, 1, 2, 0, 2, 0, 1, 2, 0, 2, 0, 2]
TRAIN = [5, 2, 0, 6, 11, 3, 9, 1, 8, 4, 10, 7]  # the model's training list; 3 and 10 tie at 0.2
# Per class, worked out by hand from the tables above:
#   slide (high -> low): class 0 [0, 8, 5, 3, 10], class 1 [6, 1], class 2 [11, 4, 2, 7, 9]
#   slide_re (low -> high): class 0 [3, 10, 5, 8, 0], class 1 [1, 6], class 2 [9, 7, 2, 4, 11]
#   random (list order): class 0 [5, 0, 3, 8, 10], class 1 [6, 1], class 2 [2, 11, 9, 4, 7]


def handmade(**overrides):
    torch.manual_seed(0)
    data = TensorData(torch.rand(12, 4), torch.tensor(LABELS))
    split = ModelSplit(torch.tensor(TRAIN), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]))
    settings = dict(
        optimizer="adam",
        lr=0.01,
        weight_decay=5e-4,
        weight_decay_mem=0.1,
        mem_thre=0.6,
        stride=2,
        width=3,
        batch_size=2,
        prune_epochs=3,
        num_cls=3,
    )
    settings.update(overrides)
    return data, split, DefenseSettings(**settings), torch.tensor(SCORES, dtype=torch.float64)


def make(cls, **overrides):
    data, split, args, scores = handmade(**overrides)
    return cls(build_model("columnfc", 3, 4), data, split, args, scores)


def windows(cls, epochs, **overrides):
    defense = make(cls, **overrides)
    return [defense.window_indices(e).tolist() for e in range(epochs)]


@pytest.fixture
def recorded_passes(monkeypatch):
    """Replace the defenses' train_pass with a recorder of (indices, optimizer) per call."""
    calls = []

    def record(model, data, idx, optimizer, batch_size):
        calls.append((idx.tolist(), optimizer))
        return 1.0, 50.0

    monkeypatch.setattr(defenses, "train_pass", record)
    return calls


def test_registry_flags():
    paper = ["slide", "slide_re", "random", "ml2", "slide_ml2", "slide_re_ml2"]
    assert {n: DEFENSES[n].window for n in paper} == {
        "slide": True,
        "slide_re": True,
        "random": True,
        "ml2": False,
        "slide_ml2": True,
        "slide_re_ml2": True,
    }
    assert {n: DEFENSES[n].needs_memscore for n in paper} == {
        "slide": True,
        "slide_re": True,
        "random": False,
        "ml2": True,
        "slide_ml2": True,
        "slide_re_ml2": True,
    }


def test_slide_windows_clip_per_class():
    # epoch 1: class 1 is exhausted, classes 0 and 2 still get their full width (the release would not)
    assert windows(Slide, 4) == [[0, 8, 5, 6, 1, 11, 4, 2], [5, 3, 10, 2, 7, 9], [10, 9], []]


def test_slide_re_windows_keep_ties_in_list_order():
    assert windows(SlideRe, 3) == [[3, 10, 5, 1, 6, 9, 7, 2], [5, 8, 0, 2, 4, 11], [0, 11]]


def test_random_windows_keep_training_list_order():
    assert windows(RandomWindow, 3) == [[5, 0, 3, 6, 1, 2, 11, 9], [3, 8, 10, 9, 4, 7], [10, 7]]


def test_window_edge_cases():
    # gaps between windows (stride > width)
    assert windows(Slide, 3, stride=3, width=1) == [[0, 6, 11], [3, 7], []]
    # a width larger than every class takes whole classes, and the start still moves
    assert windows(Slide, 2, stride=1, width=10) == [
        [0, 8, 5, 3, 10, 6, 1, 11, 4, 2, 7, 9],
        [8, 5, 3, 10, 1, 4, 2, 7, 9],
    ]


def test_window_epoch_trains_exactly_the_window(recorded_passes):
    defense = make(Slide)
    assert defense.train_epoch(1) == (1.0, 50.0)
    assert recorded_passes == [([5, 3, 10, 2, 7, 9], defense.optimizer)]


def test_empty_window_trains_nothing():
    defense = make(SlideRe)
    before = copy.deepcopy(defense.model.state_dict())
    loss, acc = defense.train_epoch(3)  # starts at position 6, past every class
    assert math.isnan(loss) and math.isnan(acc)
    assert all(torch.equal(before[k], v) for k, v in defense.model.state_dict().items())


def test_ml2_split_is_mem_at_least_threshold():
    defense = make(ML2)
    risk, general = defense.risk_split(torch.tensor(TRAIN))
    assert risk.tolist() == [0, 6, 11, 8, 4]  # 8 scores exactly 0.6
    assert general.tolist() == [5, 2, 3, 9, 1, 10, 7]


def test_ml2_risk_pass_then_general_pass(recorded_passes):
    defense = make(ML2)
    assert defense.train_epoch(0) == (1.0, 50.0)
    assert recorded_passes == [([0, 6, 11, 8, 4], defense.risk_optimizer), ([5, 2, 3, 9, 1, 10, 7], defense.optimizer)]


def test_swmr_splits_the_window_and_skips_an_empty_side(recorded_passes):
    defense = make(SlideML2)
    defense.train_epoch(0)  # window [0, 8, 5, 6, 1, 11, 4, 2]
    assert recorded_passes == [([0, 8, 6, 11, 4], defense.risk_optimizer), ([5, 1, 2], defense.optimizer)]
    recorded_passes.clear()
    defense.train_epoch(1)  # window [5, 3, 10, 2, 7, 9]: nothing >= 0.6
    assert recorded_passes == [([5, 3, 10, 2, 7, 9], defense.optimizer)]
    recorded_passes.clear()
    re_defense = make(SlideReML2)
    re_defense.train_epoch(2)  # window [0, 11]: both risky
    assert recorded_passes == [([0, 11], re_defense.risk_optimizer)]


def test_swmr_errors_when_both_sides_are_empty():
    with pytest.raises(UsageError, match="window of epoch 3 starts at 6, past every class"):
        make(SlideML2, prune_epochs=4)  # checked up front, before any training
    defense = make(SlideReML2)
    with pytest.raises(UsageError, match="epoch 3 has no sample on either side"):
        defense.train_epoch(3)


def test_risk_side_uses_weight_decay_mem():
    # every sample risky and one batch: the epoch is one risk-optimizer step, reproducible by hand
    data, split, args, scores = handmade(
        optimizer="sgd", lr=0.1, weight_decay=0.0, weight_decay_mem=0.5, mem_thre=-1.0, batch_size=64
    )
    model = build_model("columnfc", 3, 4)
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    defense = ML2(model, data, split, args, scores)
    torch.manual_seed(1)  # the same shuffle and dropout draws for the three runs
    defense.train_epoch(0)
    for clone, decay in ((reference, 0.5), (plain, 0.0)):
        torch.manual_seed(1)
        train.train_pass(clone, data, split.train, train.make_optimizer(clone.parameters(), "sgd", 0.1, decay), 64)
    assert torch.allclose(model.fc1.weight, reference.fc1.weight, atol=1e-6)
    assert not torch.allclose(model.fc1.weight, plain.fc1.weight, atol=1e-4)


def test_ml2_optimizers_keep_separate_state_across_epochs():
    defense = make(ML2)  # adam, batch 2: 5 risk samples = 3 steps, 7 general = 4 steps per epoch
    defense.train_epoch(0)
    defense.train_epoch(0)  # a new pruning iteration restarts the epoch counter, not the optimizers
    weight = defense.model.fc1.weight
    risk_state, general_state = defense.risk_optimizer.state[weight], defense.optimizer.state[weight]
    assert (int(risk_state["step"]), int(general_state["step"])) == (6, 8)
    assert not torch.equal(risk_state["exp_avg"], general_state["exp_avg"])
    assert defense.risk_optimizer.defaults["weight_decay"] == 0.1
    assert defense.optimizer.defaults["weight_decay"] == 5e-4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--defend", "slide"], "--defend slide needs --stride and --width of at least 1 (got --stride None)"),
        (["--defend", "slide_re_ml2", "--stride", "1", "--width", "0"], "(got --width 0)"),
        (["--defend", "ml2", "--weight_decay_mem", "-1"], "--weight_decay_mem must be >= 0"),
    ],
)
def test_flag_checks(flags, message):
    with pytest.raises(UsageError) as err:
        prune_modi.get_args(
            ["-1", os.path.join(REPO, "config", "digits.json"), "--pruner_name", "iter_prunetxt", *flags]
        )
    assert message in str(err.value)


# ---------------------------------------------------------------- end to end on digits

MEM_THRE = 0.3  # the digits mem_thre of run_shell.sh
PAPER_DEFENSES = ["slide", "slide_re", "random", "ml2", "slide_ml2", "slide_re_ml2"]
AUTO = [
    "--defend",
    "slide_re_ml2",
    "--weight_decay_mem",
    "0.1",
    "--stride",
    "auto",
    "--width",
    "auto",
    "--mem_thre",
    "auto",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pretrained digits run (victim + 1 shadow) with the shipped mem-scores beside it, then each
    paper defense's prune and adaptive attack on it: all in one process (helpers.run_scripts)."""
    folder = tmp_path_factory.mktemp("digits_paper")
    os.makedirs(folder / "memscore")
    for name in ("memscore_digits_columnfc.csv", "memscore_digits_columnfc.json"):  # the scores and their fingerprint
        shutil.copy(os.path.join(REPO, "memscore", name), folder / "memscore")
    runs = [pretrain_cmd(2, 1, "--quiet")]
    for defend in PAPER_DEFENSES:
        flags = ["--defend", defend, "--weight_decay_mem", "0.1", "--mem_thre", str(MEM_THRE)]
        if DEFENSES[defend].window:
            flags += ["--stride", "1", "--width", "15"]
        runs.append(prune_cmd(2, 1, "--quiet", "--no_tensorboard", *flags))
        runs.append(attack_cmd(1, "--defend", defend, "--adaptive", "--quiet"))
    runs += [prune_cmd(2, 1, "--quiet", "--no_tensorboard", *AUTO), attack_cmd(1, *AUTO, "--adaptive", "--quiet")]
    run_scripts(*runs, cwd=folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("defend", PAPER_DEFENSES)
def test_digits_end_to_end(pretrained, defend):
    window = DEFENSES[defend].window
    stem = f"iter_prunetxt_0.6_{defend}"
    result = pretrained / "result" / "digits_columnfc"
    for folder in (f"{stem}_model", f"shadow_{stem}_model_0"):
        assert sorted(os.listdir(result / folder)) == ["best.pth", "best_mask.pth", "complete.json"]
    lines = (pretrained / "log" / "digits_columnfc" / f"{stem}.txt").read_text().splitlines()
    assert lines[0] == f"digits_columnfc_{stem}{'_1-15' if window else ''}_0.1"
    assert lines[1] == "Semantics: release"
    header = [
        line
        for line in (  # what the settings mean on this data (window_rule, RiskMemory.header_lines)
            r"Window: stride 1, width 15 = \d+% of the smallest class \(\d+ samples\); a full pass in \d+ epochs "
            r"\(largest class \d+ samples; 2 epochs per pruning iteration\)"
            if window
            else None,
            r"Risk side: 23 of 539 training samples \(4\.3%\) have a mem-score >= --mem_thre 0\.3; the victim's: "
            r"\d+ of \d+"
            if issubclass(DEFENSES[defend], RiskMemory)
            else None,
        )
        if line
    ]
    for pattern, line in zip(header, lines[2:]):
        assert re.fullmatch(pattern, line), line
    lines = lines[:2] + lines[2 + len(header) :]
    assert lines[2].startswith("Pretrained Victim: Accuracy ")
    assert [line.split(":")[0] for line in lines[3:8]] == [
        "victim iter 0 best model",
        "victim iter 1 best model",
        f"Total {defend} defend time",
        "shadow 0 iter 0 best model",
        "shadow 0 iter 1 best model",
    ]
    assert lines[8].startswith("Victim pruned model test accuracy: ")
    assert lines[9] == f"Shadows: {stem} (adaptive)"
    assert lines[10] == "Semantics: release"
    accuracies = [line.split(" attack accuracy: ")[0] for line in lines[11:] if " attack accuracy: " in line]
    assert accuracies == ["Conf", "Entr", "Mentr", "Hconf"]


@pytest.mark.slow
def test_digits_auto_settings(pretrained):
    """--stride auto --width auto --mem_thre auto on digits: resolved from the victim's classes (19 to 35 samples)
    and the training set's 539 mem-scores, in the log header, the record and the table, under names of their own."""
    stem = "iter_prunetxt_0.6_slide_re_ml2_auto"
    result = pretrained / "result" / "digits_columnfc"
    for folder in (f"{stem}_model", f"shadow_{stem}_model_0"):
        assert sorted(os.listdir(result / folder)) == ["best.pth", "best_mask.pth", "complete.json"]
    lines = (pretrained / "log" / "digits_columnfc" / f"{stem}.txt").read_text().splitlines()
    assert lines[:5] == [
        f"digits_columnfc_{stem}_1-5_0.1",
        "Semantics: release",
        "Auto settings: stride 1 = max(1, round(0.02 x 19)), width 5 = ceil(0.22 x 19) (19: the smallest class of "
        "the victim's training set); mem_thre 0.194194 = the 95th percentile of 539 mem-scores (the training set's)",
        "Window: stride 1, width 5 = 26% of the smallest class (19 samples); a full pass in 31 epochs (largest class "
        "35 samples; 2 epochs per pruning iteration)",
        "Risk side: 27 of 539 training samples (5.0%) have a mem-score >= --mem_thre 0.194194; the victim's: 13 of 242",
    ]
    assert f"Shadows: {stem} (adaptive)" in lines
    [prune] = [
        r for r in find_records(str(pretrained / "result"))[0] if r["run"]["prefix"] == stem and r["kind"] == "prune"
    ]
    assert {k: prune["settings"][k] for k in ("defend", "stride", "width", "auto")} == {
        "defend": "slide_re_ml2",
        "stride": 1,
        "width": 5,
        "auto": ["stride", "width", "mem_thre"],
    }
    assert prune["settings"]["mem_thre"] == pytest.approx(0.1941935483870966, abs=1e-15)
    assert (prune["run"]["defense"], prune["run"]["window"]) == ("slide_re_ml2_auto", "1-5")
    table = results.parse_logs(str(pretrained / "log"), result_dir=str(pretrained / "result"))
    auto = one_row(table, defense="slide_re_ml2_auto", setting="adaptive")
    explicit = one_row(table, defense="slide_re_ml2", setting="adaptive")
    assert (auto["window"], explicit["window"], auto["status"]) == ("1-5", "1-15", "ok")


# ---------------------------------------------------------------- run_shell.sh


def shell_commands(tmp_path, *argv):
    """The python command lines run_shell.sh would run, recorded by a fake `python` first on PATH."""
    fake = tmp_path / "bin" / "python"
    os.makedirs(fake.parent, exist_ok=True)
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls.txt"}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "run_shell.sh"), *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    calls = tmp_path / "calls.txt"
    return proc, calls.read_text().splitlines() if calls.exists() else []


def section(gpu, config, pruner, slide_re, ml2_thre, slide_ml2):
    prune = f"prune_modi.py {gpu} {config} --pruner_name {pruner} --prune_sparsity 0.6 --prune_iter 5"
    attack = f"mia_modi.py {gpu} {config} --pruner_name {pruner} --prune_sparsity 0.6 --attacks threshold,samia"
    return [
        f"pretrain_modi.py {gpu} {config}",
        prune,
        attack,
        f"{prune} --defend slide_re --stride {slide_re[0]} --width {slide_re[1]}",
        f"{attack} --defend slide_re --adaptive",
        f"{prune} --defend ml2 --weight_decay_mem 0.1 --mem_thre {ml2_thre}",
        f"{attack} --defend ml2 --adaptive",
        f"{prune} --defend slide_ml2 --weight_decay_mem 0.1 --stride {slide_ml2[0]} --width {slide_ml2[1]} "
        f"--mem_thre {slide_ml2[2]}",
        f"{attack} --defend slide_ml2 --adaptive",
    ]


def test_run_shell_sections(tmp_path):
    proc, calls = shell_commands(tmp_path)
    assert proc.returncode == 0
    assert calls == (
        section(0, "./config/cifar10_resnet18.json", "iter_pruning", (50, 500), 0.5, (100, 500, 0.5))
        + section(0, "./config/location.json", "iter_prunetxt", (1, 15), 0.6, (1, 15, 0.6))
    )
    os.remove(tmp_path / "calls.txt")
    proc, calls = shell_commands(tmp_path, "digits")
    assert proc.returncode == 0
    assert calls == section(-1, "./config/digits.json", "iter_prunetxt", (1, 5), MEM_THRE, (1, 5, MEM_THRE))
    os.remove(tmp_path / "calls.txt")
    proc, calls = shell_commands(tmp_path, "digits", "-1", "--semantics", "corrected")  # flags reach prune + attack
    plain = section(-1, "./config/digits.json", "iter_prunetxt", (1, 5), MEM_THRE, (1, 5, MEM_THRE))
    assert proc.returncode == 0 and calls[0] == plain[0] == "pretrain_modi.py -1 ./config/digits.json"
    assert all(call.startswith(("prune_modi.py", "mia_modi.py")) for call in calls[1:])
    assert sorted(calls[1:]) == sorted(
        f"{c.split(' --defend')[0]} --semantics corrected"
        + (f" --defend{c.split(' --defend', 1)[1]}" if " --defend" in c else "")
        for c in plain[1:]
    )


def test_run_shell_rejects_an_unknown_section(tmp_path):
    proc, calls = shell_commands(tmp_path, "cifar")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.startswith("usage: bash run_shell.sh [digits [GPU-ID [FLAGS]]]")


def test_digits_mem_thre_leaves_both_sides_non_empty():
    """For the victim and the 5 shadows of run_shell.sh digits (seed 7), with the shipped scores."""
    scores = memscores.read_memscores(os.path.join(REPO, "memscore", "memscore_digits_columnfc.csv"), 539, "")
    lists = make_split(539, 1258, seed=7, shadow_num=5)
    for name in ["victim_train"] + [f"shadow_train_{i}" for i in range(5)]:
        risky = int((scores[lists[name]] >= MEM_THRE).sum())
        assert 0 < risky < len(lists[name]), name
