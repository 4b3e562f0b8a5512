"""Settings derived from the data (`--stride auto`, `--width auto`, `--mem_thre auto`): the exact rules of
docs/defenses.md, what they resolve to on digits, the flags, and the names of an auto run (never an explicit
run's). The digits run with auto settings end to end is in test_defenses_paper.py (its module fixture)."""

import json
import os

import numpy as np
import pytest
import torch

import audit
import auto_settings
import memscores
import mia_modi
import prune_modi
from auditing import plan as audit_plan
from auto_settings import auto_mem_thre, auto_window, derive
from common import UsageError
from conftest import REPO, as_repo
from datasets import get_dataset
from defenses import DEFENSES, DefenseSettings, RiskMemory, Slide, SlideRe, SlideReML2
from gridrun import plan as grid_plan
from gridrun import spec as grid_spec
from helpers import DIGITS
from paths import log_path
from splits import make_split

DIGITS_SCORES = os.path.join(REPO, "memscore", "memscore_digits_columnfc.csv")


def labels_of(sizes):
    """Labels with sizes[k] samples of class k, interleaved as a training list would be."""
    return torch.tensor([k for k, n in enumerate(sizes) for _ in range(n)])[torch.randperm(sum(sizes))]


@pytest.mark.parametrize(
    "sizes, stride, width",
    [
        ([3, 50, 7], 1, 1),  # the smallest class decides: ceil(0.66) = 1, round(0.06) -> at least 1
        ([90], 2, 20),  # docs/defenses.md's example: "90 per class gives stride 2, width 20"
        ([50, 60], 1, 11),  # 0.22 * 50 is 11.000000000000002 in floats: integer arithmetic keeps it 11
        ([25], 1, 6),  # 0.5 rounds half up to 1
        ([125, 300], 3, 28),  # 2.5 rounds half up to 3 (Python's round() would give 2)
        ([2250], 45, 495),  # CIFAR10's victim classes: near the paper's stride 50, width 500
        ([1], 1, 1),
    ],
)
def test_window_rule_on_small_and_uneven_classes(sizes, stride, width):
    assert auto_window(sizes) == (stride, width)
    values, line = derive(["stride", "width"], labels_of(sizes))
    assert values == {"stride": stride, "width": width}
    c = min(sizes)
    assert line == (
        f"Auto settings: stride {stride} = max(1, round(0.02 x {c})), width {width} = ceil(0.22 x {c}) "
        f"({c}: the smallest class of the victim's training set)"
    )


def test_digits_resolves_to_run_shells_window_and_the_95th_percentile():
    """The digits victim (seed 7) has 19 to 35 samples a class: stride 1, width 5, run_shell.sh's digits window;
    mem_thre is the 95th percentile of the shipped scores, 0.194194, which puts 27 of 539 on the risk side."""
    scores = memscores.read_memscores(DIGITS_SCORES, 539, "")
    train, _ = get_dataset("digits")
    victim = torch.from_numpy(make_split(539, 1258, seed=7, shadow_num=5)["victim_train"])
    values, line = derive(["stride", "width", "mem_thre"], train.y[victim], scores)
    assert values["stride"] == 1 and values["width"] == 5
    assert values["mem_thre"] == pytest.approx(0.1941935483870966, abs=1e-15)
    assert int((scores >= values["mem_thre"]).sum()) == 27
    assert line == (
        "Auto settings: stride 1 = max(1, round(0.02 x 19)), width 5 = ceil(0.22 x 19) (19: the smallest class of "
        "the victim's training set); mem_thre 0.194194 = the 95th percentile of 539 mem-scores (the training set's)"
    )


def test_mem_thre_is_the_stated_quantile_inside_the_scores_range():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8, 0.4, 0.7, 0.3, 0.6, 0.0, 0.2, 1.0], dtype=torch.float64)
    assert auto_settings.MEM_QUANTILE == 0.95
    assert auto_mem_thre(scores) == pytest.approx(float(np.quantile(scores.numpy(), 0.95)))
    assert auto_mem_thre(scores) == pytest.approx(0.945)  # between the two highest, 0.9 and 1.0
    for scores in ([0.3] * 5, [0.0] * 99 + [1.0], [-0.18, -0.01]):
        thre = auto_mem_thre(torch.tensor(scores, dtype=torch.float64))
        assert min(scores) <= thre <= max(scores)
        settings = DefenseSettings(mem_thre=thre)
        RiskMemory.check_memscores(torch.tensor(scores, dtype=torch.float64), settings, "s.csv")  # in range
    values, line = derive(["mem_thre"], torch.tensor([0, 1]), torch.tensor([0.0, 0.5, 1.0]))
    assert values == {"mem_thre": pytest.approx(0.95)}
    assert line == "Auto settings: mem_thre 0.95 = the 95th percentile of 3 mem-scores (the training set's)"
    assert derive([], torch.tensor([0, 1])) == ({}, None)


# ---------------------------------------------------------------- flags and names


def prune_args(*flags):
    return prune_modi.get_args(["-1", DIGITS, "--pruner_name", "iter_prunetxt", *flags])


def attack_args(*flags):
    return mia_modi.get_args(["-1", DIGITS, "--pruner_name", "iter_prunetxt", *flags])


def test_each_flag_takes_a_number_or_auto():
    args = prune_args("--defend", "slide_re_ml2", "--stride", "auto", "--width", "7", "--mem_thre", "auto")
    assert (args.stride, args.width, args.mem_thre, args.auto) == ("auto", 7, "auto", ["stride", "mem_thre"])
    args = prune_args("--defend", "slide_re", "--stride", "1", "--width", "5")
    assert (args.stride, args.width, args.mem_thre, args.auto) == (1, 5, 0.6, [])
    with pytest.raises(UsageError, match="--stride: expected an integer or auto, got 'x'"):
        prune_args("--defend", "slide_re", "--stride", "x", "--width", "5")
    with pytest.raises(UsageError, match="--mem_thre: expected a number or auto, got 'high'"):
        prune_args("--defend", "ml2", "--mem_thre", "high")
    with pytest.raises(UsageError, match=r"\(got --width 0\)"):  # a number is checked as before
        prune_args("--defend", "slide_re", "--stride", "auto", "--width", "0")


@pytest.mark.parametrize(
    "defend, flags, auto, prefix",
    [
        ("slide_re", ["--stride", "auto", "--width", "auto"], ["stride", "width"], "iter_prunetxt_0.6_slide_re_auto"),
        ("slide", ["--stride", "1", "--width", "auto"], ["width"], "iter_prunetxt_0.6_slide_auto"),
        ("ml2", ["--mem_thre", "auto"], ["mem_thre"], "iter_prunetxt_0.6_ml2_auto"),
        (
            "slide_ml2",
            ["--stride", "1", "--width", "5", "--mem_thre", "auto"],
            ["mem_thre"],
            "iter_prunetxt_0.6_slide_ml2_auto",
        ),
        # a setting the defense does not read changes nothing, as a number there does
        ("slide_re", ["--stride", "1", "--width", "5", "--mem_thre", "auto"], [], "iter_prunetxt_0.6_slide_re"),
        ("ml2", ["--stride", "auto", "--mem_thre", "0.3"], [], "iter_prunetxt_0.6_ml2"),
        ("ppb", ["--stride", "auto", "--mem_thre", "auto"], [], "iter_prunetxt_0.6_ppb_4.0"),
    ],
)
def test_names_say_auto_and_the_attack_finds_them(defend, flags, auto, prefix):
    args = prune_args("--defend", defend, *flags)
    assert args.auto == auto
    cls = DEFENSES[defend]
    assert cls.prefix(args.pruner_name, args.prune_sparsity, args.defend_arg, args.semantics, bool(auto)) == prefix
    assert os.path.basename(log_path(args, bool(auto))) == f"{prefix.removesuffix('_4.0')}.txt"
    attack = attack_args("--defend", defend, "--adaptive", *flags)
    assert mia_modi.victim_prefix(attack, cls) == prefix
    victim, shadows, shown, how, _ = mia_modi.model_folders(attack, cls)
    assert victim.endswith(f"{prefix}_model") and shadows[0].endswith(f"shadow_{prefix}_model_0")
    for flag in auto:
        assert f"--{flag} auto" in how


def test_explicit_names_are_the_releases():
    assert SlideRe.prefix("iter_prunetxt", 0.6, 4) == "iter_prunetxt_0.6_slide_re"
    assert SlideRe.prefix("iter_prunetxt", 0.6, 4, "corrected") == "iter_prunetxt_0.6_slide_re_corrected"
    assert SlideRe.prefix("iter_prunetxt", 0.6, 4, "corrected", True) == "iter_prunetxt_0.6_slide_re_auto_corrected"
    args = prune_args("--defend", "slide_re", "--stride", "1", "--width", "5", "--tag", "t")
    assert log_path(args) == os.path.join("log", "digits_columnfc", "iter_prunetxt_0.6_slide_re_tag-t.txt")
    assert log_path(args, True) == os.path.join("log", "digits_columnfc", "iter_prunetxt_0.6_slide_re_auto_tag-t.txt")
    how = mia_modi.model_folders(attack_args("--defend", "slide", "--adaptive"), Slide)[3]
    assert "--stride <stride> --width <width>" in how


# ---------------------------------------------------------------- grids


def write_grid(folder, defenses):
    with open(os.path.join(REPO, "grids", "digits.json")) as f:
        data = {**json.load(f), "original": False, "defenses": defenses}
    path = os.path.join(folder, "g.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_a_grid_takes_auto_and_names_its_steps_so(tmp_path):
    defenses = [
        {"defend": "base"},
        {"defend": "slide_re", "stride": 1, "width": 5},
        {"defend": "slide_re", "stride": "auto", "width": "auto"},
        {"defend": "slide_re_ml2", "stride": 1, "width": 5, "mem_thre": "auto", "weight_decay_mem": 0.1},
    ]
    grid = grid_spec.Grid(write_grid(str(tmp_path), defenses), "g.json")
    assert grid.tags("config/digits.json") == ["", "", "", ""]  # the names differ: no tag needed
    steps = {s.name: s for s in grid_plan.expand(grid)}
    run = "digits_columnfc"
    explicit, auto = (
        steps[f"{run}/prune.iter_prunetxt_0.6_slide_re"],
        steps[f"{run}/prune.iter_prunetxt_0.6_slide_re_auto"],
    )
    assert explicit.argv[explicit.argv.index("--stride") : explicit.argv.index("--stride") + 4] == [
        "--stride",
        "1",
        "--width",
        "5",
    ]
    assert auto.argv[auto.argv.index("--stride") : auto.argv.index("--stride") + 4] == [
        "--stride",
        "auto",
        "--width",
        "auto",
    ]
    assert explicit.log.endswith("iter_prunetxt_0.6_slide_re.txt") and auto.log.endswith(
        "iter_prunetxt_0.6_slide_re_auto.txt"
    )
    attack = steps[f"{run}/attack.iter_prunetxt_0.6_slide_re_auto"]
    assert attack.argv[attack.argv.index("--defend") :][:6] == [
        "--defend",
        "slide_re",
        "--stride",
        "auto",
        "--width",
        "auto",
    ]
    assert "--stride" not in steps[f"{run}/attack.iter_prunetxt_0.6_slide_re"].argv  # the explicit attack as before
    swmr = steps[f"{run}/attack.iter_prunetxt_0.6_slide_re_ml2_auto"]
    assert "--mem_thre" in swmr.argv and "--stride" not in swmr.argv
    with pytest.raises(UsageError, match=r"mem_thre must be float, \"auto\" or a non-empty list of them, got 'high'"):
        grid_spec.Grid(write_grid(str(tmp_path), [{"defend": "ml2", "mem_thre": "high"}]), "g.json")
    with pytest.raises(UsageError, match="defend_arg must be float or a non-empty list of them, got 'auto'"):
        grid_spec.Grid(
            write_grid(str(tmp_path), [{"defend": "base"}, {"defend": "ppb", "defend_arg": "auto"}]), "g.json"
        )


def test_paper_main_uses_auto_where_the_paper_gives_no_setting():
    """CIFAR10 (all three models) and Location keep the paper's numbers; the other configs derive theirs."""
    grid = grid_spec.Grid(os.path.join(REPO, "grids", "paper_main.json"), "grids/paper_main.json")
    for config, settings in grid.settings.items():
        paper = "cifar10_" in config or "location" in config
        for _, cls, setting in settings:
            derived = [k for k in ("stride", "width", "mem_thre") if setting.get(k) == "auto"]
            read = [k for k in ("stride", "width") if cls.window] + (
                ["mem_thre"] if issubclass(cls, RiskMemory) else []
            )
            assert derived == ([] if paper else read), (config, cls.name, setting)
    assert SlideReML2.derivable == ("stride", "width", "mem_thre")


# ---------------------------------------------------------------- the audit


@pytest.mark.slow
def test_the_audit_takes_auto(tmp_path, monkeypatch):
    """audit.py --defense slide_re:stride=auto,width=auto: a stage named _auto whose models all prune with the values
    derived from model 0's training set (M = 3 models of 2 epochs, 2 pruning iterations of 1 epoch)."""
    as_repo(monkeypatch, tmp_path)
    tiny = ["--epochs", "2", "--quiet", "--no_tensorboard", "--batch_size", "64"]
    step = lambda name, *flags: audit.main([name, "-1", DIGITS, *flags, *tiny])
    step("prepare", "--models", "3", "--canaries", "8")
    step("pretrain", "--group", "0", "--group_size", "3")
    step("memscore")
    entry = audit_plan.parse_defense("slide_re:stride=auto,width=auto")
    flags = [f for key, value in entry.items() for f in (f"--{key}", value)]
    step(
        "prune",
        "--group",
        "0",
        "--group_size",
        "3",
        "--pruner_name",
        "iter_prunetxt",
        "--prune_iter",
        "2",
        "--prune_epochs",
        "1",
        *flags,
    )
    audit_dir = os.path.join("result", "digits_columnfc", "audit")
    plan = audit_plan.Plan.load(os.path.join(audit_dir, "plan.npz"), "")
    sizes = np.bincount(plan.labels[: plan.n][plan.member[0]])
    stride, width = auto_window(sizes[sizes > 0])
    for m in (0, 1, 2):
        with open(os.path.join(audit_dir, "iter_prunetxt_0.6_slide_re_auto", f"model_{m}", "complete.json")) as f:
            settings = json.load(f)["settings"]
        assert (settings["stride"], settings["width"]) == (stride, width)
    with open(os.path.join("log", "digits_columnfc", "audit", "iter_prunetxt_0.6_slide_re_auto.group0.txt")) as f:
        text = f.read()
    c = min(sizes[sizes > 0])
    assert (
        f"Auto settings: stride {stride} = max(1, round(0.02 x {c})), width {width} = ceil(0.22 x {c}) ({c}: "
        "the smallest class of model 0's training set)" in text
    )
    assert f"Window: stride {stride}, width {width} = " in text
