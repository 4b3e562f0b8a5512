"""Four fixes, each tested where it fails without it: a prune run again before its attack gives one results
row, not an extra empty one marked ok; summarize names a log file with nothing of a run in it; release mode
refuses an RSW window that passes every class (the release's prune script stops there); pretraining keeps no
epoch of 0 % dev accuracy, as the release's does."""

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import pretrain_modi
from common import DivergedError, UsageError
from conftest import REPO, run_script, write_run_record
from datasets import TensorData
from defenses import DEFENSES, DefenseSettings, window_at
from models import build_model
from progress import Progress
from reporting import results
from splits import ModelSplit

CONFIG = os.path.join(REPO, "config", "digits.json")
RUN = "digits_columnfc"
LOG = "iter_prunetxt_0.6_base.txt"
SHADOWS = ["--shadow_num", "2"]
PRUNE = ["--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "1", *SHADOWS, "--no_tensorboard"]
ATTACK = ["--pruner_name", "iter_prunetxt", "--attacks", "threshold", *SHADOWS, "--no_tensorboard"]


# ---------------------------------------------------------------- 1. a prune run again, then its attack


def prune_block(pretrained, time, ended=None):
    """A Base prune block as prune_modi.py writes it (2 iterations, one shadow), or one that ended early."""
    lines = [
        f"{RUN}_iter_prunetxt_0.6_0.0005",
        "Semantics: release",
        f"Pretrained Victim: Accuracy {pretrained:.3f}, Loss 2.214",
        "victim iter 0 best model: Accuracy 39.679, Loss 2.124",
    ]
    if ended:
        return "\n".join([*lines, f"Run ended early: {ended}"]) + "\n"
    lines += [
        "victim iter 1 best model: Accuracy 32.339, Loss 2.137",
        f"Total Base defend time: {time:.3f}s",
        "shadow 0 iter 0 best model: Accuracy 37.385, Loss 2.160",
        "shadow 0 iter 1 best model: Accuracy 35.780, Loss 2.175",
    ]
    return "\n".join(lines) + "\n"


def attack_block(victim, conf):
    return (
        f"Victim pruned model test accuracy: {victim:.3f}\nShadows: iter_prunetxt_0.6 (base)\nSemantics: release\n"
        f"Conf attack accuracy: {conf:.3f}\nConf attack AUC: 0.5400\n"
    )


def write_log(tmp_path, blocks):
    """log/<run>/<LOG> made of blocks; returns each block's byte offset."""
    path = tmp_path / "log" / RUN / LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(blocks))
    return [sum(len(b.encode()) for b in blocks[:i]) for i in range(len(blocks))]


def table(tmp_path, result_dir=None, log_dir="log"):
    collected = results.collect(tmp_path / log_dir, result_dir, newest_only=True)
    assert collected.problems == []
    return collected.table


def values(df):
    return [
        (row.setting if isinstance(row.setting, str) else None, row.pretrained_acc, row.defend_time_s, row.status)
        for row in df.itertuples()
    ]


@pytest.mark.parametrize(
    "shapes, expected",
    [
        # pruned, pruned again (a rerun, or a grid step retried after its driver was killed), attacked
        (["prune 81", "prune 82", "attack"], [("base", 82.0, 2.0, "ok")]),
        # the grid killed during the second prune (SIGTERM: its block ends early), resumed: pruned a third time
        (["prune 81", "killed", "prune 83", "attack"], [("base", 83.0, 3.0, "ok")]),
        # the same, killed with kill -9 (no last line: unfinished)
        (["prune 81", "prune 82 cut", "prune 83", "attack"], [("base", 83.0, 3.0, "ok")]),
    ],
)
def test_a_prune_run_again_then_attacked_is_one_row(tmp_path, shapes, expected):
    """One row for the setting, with the later prune run's numbers: not a second row of the first prune run
    with an empty setting and no attack, marked ok."""
    blocks = []
    for shape in shapes:
        if shape == "attack":
            blocks.append(attack_block(33.216, 53.3))
        elif shape == "killed":
            blocks.append(prune_block(82, 0, ended="interrupted (SIGTERM)"))
        elif shape.endswith("cut"):
            blocks.append(prune_block(82, 0).split("Total")[0])
        else:
            acc = float(shape.split()[1])
            blocks.append(prune_block(acc, acc - 80))
    write_log(tmp_path, blocks)
    df = table(tmp_path)
    assert values(df) == expected
    assert df.loc[0, "pruned_acc"] == 33.216 and df.loc[0, "Conf_acc"] == 53.3
    assert len(results.parse_logs(tmp_path / "log", newest_only=False)) == len(shapes) - 1  # --all keeps them


def test_a_prune_run_again_after_an_attack_or_without_any(tmp_path):
    """Pruned, attacked, pruned again (no attack yet): the setting's row with the new prune run's numbers,
    stale (issue 33, item 4); pruned twice without attacks: the newer run's row alone."""
    write_log(tmp_path, [prune_block(81, 1), attack_block(33.216, 53.3), prune_block(82, 2)])
    assert values(table(tmp_path)) == [("base", 82.0, 2.0, results.STALE)]
    write_log(tmp_path, [prune_block(81, 1), prune_block(82, 2)])
    assert values(table(tmp_path)) == [(None, 82.0, 2.0, "ok")]


def test_a_prune_run_again_is_one_row_from_records_too(tmp_path):
    """The same from the run records (with their log, and alone): one row, the second prune run's values."""
    at = write_log(tmp_path, [prune_block(81, 1), prune_block(82, 2), attack_block(33.216, 53.3)])
    path = os.path.join("log", RUN, LOG)
    for run_id, offset, acc, time in (("10", at[0], 81.0, 1.0), ("11", at[1], 82.0, 2.0)):
        write_run_record(
            tmp_path,
            "prune",
            run_id,
            {"pretrained": {"accuracy": acc, "loss": 2.2}, "defend_time_s": time, "dp_epsilon": None},
            log={"path": path, "offset": offset, "end": None},
        )
    attacks = [{"name": "Conf", "accuracy": 53.3, "AUC": 0.54}]
    write_run_record(
        tmp_path,
        "attack",
        "12",
        {"victim": "pruned", "victim_test_acc": 33.216, "shadows": "x", "attacks": attacks},
        log={"path": path, "offset": at[2], "end": None},
        setting="base",
    )
    expected = [("base", 82.0, 2.0, "ok")]
    assert values(table(tmp_path, tmp_path / "result")) == expected
    assert values(table(tmp_path, tmp_path / "result", log_dir="no_logs")) == expected


# ---------------------------------------------------------------- 2. a log file with nothing of a run in it


def test_a_log_without_a_run_is_named_as_skipped(tmp_path):
    folder = tmp_path / "log" / RUN
    folder.mkdir(parents=True)
    (folder / LOG).write_text(prune_block(81, 1) + attack_block(33.216, 53.3))
    (folder / "iter_prunetxt_0.8_base.txt").write_text("garbage\n")
    (folder / "iter_prunetxt_0.7_base.txt").write_text("")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "summarize.py"), "log"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"skipped log/{RUN}/iter_prunetxt_0.7_base.txt: empty (the format is in docs/results.md)",
        f"skipped log/{RUN}/iter_prunetxt_0.8_base.txt: no line of a prune or attack run in it (the format "
        f"is in docs/results.md)",
        "wrote 1 rows to results.csv",
    ]


# ---------------------------------------------------------------- 3. an RSW window past every class


def two_three_classes(cls, semantics, prune_epochs=2):
    """cls over classes of 2 and 3 samples, stride 3, width 5: epoch 1's window starts at 3, past both."""
    data = TensorData(torch.rand(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    split = ModelSplit(torch.arange(5), torch.arange(0), torch.arange(0))
    settings = DefenseSettings(
        stride=3, width=5, prune_epochs=prune_epochs, num_cls=2, batch_size=4, mem_thre=0.5, semantics=semantics
    )
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2], dtype=torch.float64)
    return cls(build_model("columnfc", 2, 4), data, split, settings, scores)


def refusal(name, largest=3, epoch=1, start=3):
    return (
        f"--defend {name}: the window of epoch {epoch} starts at {start}, past every class (the largest has "
        f"{largest} samples), where the release's prune script stops (its DataLoader gets no sample); lower "
        f"--stride or --prune_epochs, or pass --semantics corrected (such an epoch then trains nothing)"
    )


@pytest.mark.parametrize("name", ["slide", "slide_re", "random"])
def test_rsw_release_refuses_a_window_past_every_class(name):
    with pytest.raises(UsageError) as err:
        two_three_classes(DEFENSES[name], "release")
    assert str(err.value) == refusal(name)
    # one epoch is not refused: class 0 (2 samples) lowers the shared end to 2, so class 1 gives 2 of its 3
    assert len(two_three_classes(DEFENSES[name], "release", prune_epochs=1).window_indices(0)) == 2 + 2
    corrected = two_three_classes(DEFENSES[name], "corrected")  # ours: the epoch trains nothing, as before
    assert corrected.window_indices(0).tolist() == window_at(corrected.groups, 3, 5, 0).tolist()
    assert sorted(corrected.window_indices(0).tolist()) == [0, 1, 2, 3, 4]
    loss, acc = corrected.train_epoch(1)
    assert math.isnan(loss) and math.isnan(acc)


@pytest.mark.parametrize("semantics", ["release", "corrected"])
def test_swmr_refusal_is_worded_as_before(semantics):
    with pytest.raises(UsageError) as err:
        two_three_classes(DEFENSES["slide_ml2"], semantics)
    assert str(err.value) == (
        "--defend slide_ml2: the window of epoch 1 starts at 3, past every class (the largest has 3 samples); "
        "lower --stride or --prune_epochs"
    )


# ---------------------------------------------------------------- 4. pretraining's best dev accuracy starts at 0


def test_pretraining_keeps_no_epoch_of_zero_dev_accuracy(tmp_path):
    """A real pretraining run whose every epoch scores 0 % on its dev set (lr 0 keeps the seeded initial
    model, and the dev set is the samples it gets wrong): as in the release, no epoch is kept, so the run
    ends with one error and writes no checkpoint. The dev set with one sample it gets right keeps epoch 0."""
    generator = torch.Generator().manual_seed(0)
    data = TensorData(torch.rand(200, 4, generator=generator), torch.randint(0, 3, (200,), generator=generator))
    torch.manual_seed(3)
    model = build_model("columnfc", 3, 4)
    model.eval()
    with torch.no_grad():
        right = model(data.x).argmax(1) == data.y
    wrong = (~right).nonzero().flatten()
    assert len(wrong) >= 40 and right.any()
    args = SimpleNamespace(
        model_name="columnfc",
        num_cls=3,
        input_dim=4,
        optimizer="adam",
        lr=0.0,
        weight_decay=0.0,
        epochs=3,
        early_stop=0,
        batch_size=16,
    )
    split = ModelSplit(torch.arange(200), wrong[:20], wrong[20:])
    folder = tmp_path / "victim"
    folder.mkdir()
    torch.manual_seed(3)  # pretrain builds the same initial model
    with pytest.raises(DivergedError) as err:
        pretrain_modi.pretrain(args, data, split, str(folder), Progress())
    assert str(err.value) == (
        "the victim scored 0 % dev accuracy in every epoch, so no model was kept (as in the release, an epoch is "
        "kept only above the best so far, which starts at 0); check the config's lr, or train longer (--epochs, "
        "--early_stop)"
    )
    assert list(folder.iterdir()) == []

    one_right = torch.cat([right.nonzero().flatten()[:1], wrong[:19]])
    torch.manual_seed(3)
    best, _ = pretrain_modi.pretrain(
        args, data, ModelSplit(torch.arange(200), one_right, wrong[20:]), str(folder), Progress()
    )
    assert best["epoch"] == 0 and best["acc"] == pytest.approx(5.0)  # 1 of 20, in float32


# ---------------------------------------------------------------- the scripts end to end


def snapshot(folder):
    """relative path -> sha256 of every file under folder."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("round4")
    run_script("pretrain_modi.py", "-1", CONFIG, "--epochs", "1", *SHADOWS, "--no_tensorboard", cwd=folder)
    return folder


@pytest.mark.slow
def test_prune_prune_attack_summarize_is_one_row(pretrained, tmp_path):
    """The issue's smallest case with the scripts: prune, prune again, attack, summarize: one row, the second
    prune run's numbers (those of the models the attack read), from the logs and from the records alone."""
    folder = tmp_path / "run"
    shutil.copytree(pretrained, folder)
    run_script("prune_modi.py", "-1", CONFIG, *PRUNE, cwd=folder)
    run_script("prune_modi.py", "-1", CONFIG, *PRUNE, cwd=folder)
    run_script("mia_modi.py", "-1", CONFIG, *ATTACK, "--bootstrap", "0", cwd=folder)
    log = (folder / "log" / RUN / LOG).read_text()
    times = [float(t) for t in re.findall(r"Total Base defend time: (\S+)s", log)]
    victim = float(re.search(r"Victim pruned model test accuracy: (\S+)", log).group(1))
    conf = float(re.search(r"Conf attack accuracy: (\S+)", log).group(1))
    assert len(times) == 2
    run_script("summarize.py", "log", cwd=folder)
    df = pd.read_csv(folder / "results.csv")
    assert list(df["setting"]) == ["base"] and list(df["status"]) == ["ok"]
    assert (df.loc[0, "defend_time_s"], df.loc[0, "pruned_acc"], df.loc[0, "Conf_acc"]) == (times[1], victim, conf)
    run_script("summarize.py", "no_logs", "--result_dir", "result", "--allow_empty", "--out", "records.csv", cwd=folder)
    alone = pd.read_csv(folder / "records.csv")
    assert list(alone["setting"]) == ["base"] and alone.loc[0, "pruned_acc"] == victim


@pytest.mark.slow
def test_prune_refuses_a_window_past_every_class_under_release(pretrained, tmp_path):
    """prune_modi.py --defend slide_re with a stride whose second epoch starts past every digits class: one
    error line, exit 2, no file written or changed; --semantics corrected runs it as before."""
    folder = tmp_path / "run"
    shutil.copytree(pretrained, folder)
    window = ["--defend", "slide_re", "--stride", "100", "--width", "5", "--prune_epochs", "2"]
    before = snapshot(folder)
    proc = run_script("prune_modi.py", "-1", CONFIG, *PRUNE, *window, cwd=folder, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    largest = re.search(r"the largest has (\d+) samples", proc.stderr)
    assert largest and 20 < int(largest.group(1)) < 100, proc.stderr  # a digits model's largest class
    assert lines == ["error: " + refusal("slide_re", int(largest.group(1)), start=100)], proc.stderr
    assert snapshot(folder) == before
    run_script("prune_modi.py", "-1", CONFIG, *PRUNE, *window, "--semantics", "corrected", cwd=folder)
    assert "Total slide_re defend time" in (folder / "log" / RUN / "iter_prunetxt_0.6_slide_re.txt").read_text()
