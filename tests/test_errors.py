"""Every bad input the user can hit, run as the user runs the scripts: one readable `error: ...` line
on stderr naming the problem and the fix, exit status 2 (usage) or 1 (missing prerequisite), no
traceback, and not one byte of the existing outputs (split, checkpoints, logs) changed."""

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

import memscores
from common import UsageError, pick_device
from conftest import REPO, copy_repo, run_script
from datasets import get_dataset
from helpers import pretrain_cmd, run_forked, run_scripts
from models import build_model
from train import save_checkpoint

DIGITS = os.path.join(REPO, "config", "digits.json")
PURCHASE = os.path.join(REPO, "config", "purchase.json")
RUN = "result/digits_columnfc"
PRUNE = ["--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "1", "--shadow_num", "1"]
MIA = ["--pruner_name", "iter_prunetxt", "--shadow_num", "1", "--attacks", "threshold"]
N_TRAIN = 539  # digits training rows (its 30/70 split) = mem-score rows


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny digits run: split, victim + 1 shadow, their Base-pruned copies and both logs, made by a copy
    of the repo (no mem-scores) in the same folder, so that its data/datasets/ and memscore/ are the
    folder's own: the cases set them up there (write_purchase, write_memscores)."""
    folder = tmp_path_factory.mktemp("pretrained")
    copy_repo(folder, memscores=False)
    run_scripts(
        pretrain_cmd(1, 1), ("prune_modi.py", "-1", DIGITS, *PRUNE, "--no_tensorboard"), cwd=folder, repo=folder
    )
    return folder


# ---------------------------------------------------------------- what the cases set up


def write_config(name="bad.json", text=None, **changes):
    """A setup writing digits.json with keys changed (None deletes one), or `text` verbatim."""

    def setup(folder):
        if text is None:
            with open(DIGITS) as f:
                config = json.load(f)
            config.update(changes)
            body = json.dumps({k: v for k, v in config.items() if v is not None})
        else:
            body = text
        (folder / name).write_text(body)

    return setup


def write_purchase(rows):
    def setup(folder):
        path = folder / "data/datasets/purchase100/purchase100.txt"
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(",".join(map(str, row)) for row in rows) + "\n")

    return setup


def purchase_rows(label=1, bad=None, columns=601):
    rows = [[label if c == 0 else (r + c) % 2 for c in range(columns)] for r in range(20)]
    if bad is not None:
        rows[3][5] = bad
    return rows


def write_memscores(values):
    """A digits mem-score CSV of these values with a matching fingerprint (as compute_memscore.py writes),
    so that the run gets past the fingerprint to the check the case is about."""

    def setup(folder):
        (folder / "memscore").mkdir()
        path = folder / "memscore/memscore_digits_columnfc.csv"
        pd.DataFrame({"0": values}).to_csv(path)
        train = get_dataset("digits", root=str(folder / "data/datasets"))[0]
        fields = memscores.fingerprint("digits", "columnfc", train.x, train.y, "seeded 30/70 split (random_state 0)")
        memscores.write_sidecar(str(path), path.read_bytes(), fields)

    return setup


def remove(*paths):
    def setup(folder):
        for path in paths:
            target = folder / path
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def copy_folder(source, target):
    def setup(folder):
        shutil.copytree(folder / source, folder / target)

    return setup


def truncate(path):
    def setup(folder):
        data = (folder / path).read_bytes()
        (folder / path).write_bytes(data[: len(data) // 2])

    return setup


def checkpoint_for_five_classes(folder):
    save_checkpoint(str(folder / RUN / "victim_model/best.pth"), build_model("columnfc", 5, 64), 0, 50.0, 1.0)


def result_is_a_file(folder):
    shutil.rmtree(folder / "result")
    (folder / "result").write_text("")


def foreign_split(folder):
    np.savez(folder / RUN / "split.npz", train=np.arange(10), test=np.arange(10, 20))


def write_bytes(path, data):
    def setup(folder):
        (folder / path).write_bytes(data)

    return setup


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    script: str
    args: list
    status: int
    words: list  # must all appear in the error line
    setup: Callable = None


PRE, PRU, ATT = "pretrain_modi.py", "prune_modi.py", "mia_modi.py"
SLIDE_RE = ["--defend", "slide_re", "--stride", "1", "--width", "15"]


def bad_config(name, words, setup=None):
    """pretrain_modi.py on a bad.json the setup writes: refused as usage (2)."""
    return Case(name, PRE, ["-1", "bad.json"], 2, words, setup)


def pretrain_case(name, flags, status, words, setup=None):
    return Case(name, PRE, ["-1", DIGITS, *flags], status, words, setup)


def prune_case(name, flags, status, words, setup=None):
    """prune_modi.py on the pretrained run, Base (PRUNE) unless flags say otherwise."""
    return Case(name, PRU, ["-1", DIGITS, *PRUNE, *flags], status, words, setup)


def attack_case(name, flags, status, words, setup=None):
    """mia_modi.py on the Base-pruned run (MIA) and flags."""
    return Case(name, ATT, ["-1", DIGITS, *MIA, *flags], status, words, setup)


CASES = [
    # config
    Case("config_missing", PRE, ["-1", "nope.json"], 2, ["nope.json", "not found", "config/digits.json"]),
    bad_config(
        "config_invalid_json",
        ["bad.json", "not valid JSON", "line 2", "fix"],
        write_config(text='{"dataset_name": "digits",\n "epochs": 5,,}'),
    ),
    bad_config(
        "config_not_text",
        ["bad.json", "not a text file", "config/digits.json"],
        write_bytes("bad.json", b"\xff\xfe{\x00\x93"),
    ),
    bad_config(
        "config_unknown_key", ["unknown key 'momentum'", "valid keys", "weight_decay"], write_config(momentum=0.9)
    ),
    bad_config("config_wrong_type", ["'epochs' must be int", "'5'", "fix the config"], write_config(epochs="5")),
    bad_config("config_missing_key", ["missing key", "lr", "add them"], write_config(lr=None)),
    bad_config(
        "config_unknown_dataset",
        ["unknown dataset_name 'mnist'", "cifar10", "digits"],
        write_config(dataset_name="mnist"),
    ),
    bad_config(
        "config_unknown_model", ["unknown model_name 'mlp'", "columnfc", "resnet18"], write_config(model_name="mlp")
    ),
    bad_config("config_num_cls", ["num_cls=12", "digits has num_cls=10", "fix the config"], write_config(num_cls=12)),
    bad_config("config_input_dim", ["input_dim=32", "input_dim=64", "fix the config"], write_config(input_dim=32)),
    bad_config(
        "config_model_for_images",
        ["'resnet18' does not fit dataset digits", "columnfc"],
        write_config(model_name="resnet18"),
    ),
    bad_config(
        "config_unknown_optimizer", ["unknown optimizer 'rmsprop'", "adam", "sgd"], write_config(optimizer="rmsprop")
    ),
    pretrain_case("lr_not_positive", ["--lr", "0"], 2, ["lr must be > 0", "--lr"]),
    # flags
    pretrain_case("flag_not_an_int", ["--epochs", "x"], 2, ["--epochs", "invalid int value", "--help"]),
    prune_case("batch_size_zero", ["--batch_size", "0"], 2, ["--batch_size", "1..2147483647", "got 0"]),
    Case("gpu_id_below_minus_one", PRE, ["-2", DIGITS], 2, ["GPU-ID -2", "-1 for the CPU"]),
    prune_case("unknown_defend", ["--defend", "wemem"], 2, ["unknown defense 'wemem'", "slide_re", "ppb", "dp"]),
    Case("unknown_attack", ATT, ["-1", DIGITS, "--attacks", "threshold,lria"], 2, ["unknown attack", "lria", "samia"]),
    Case(
        "unknown_pruner_prune",
        PRU,
        ["-1", DIGITS, "--pruner_name", "magnitude"],
        2,
        ["unknown pruner_name 'magnitude'", "iter_pruning", "iter_prunetxt", "l1unstructure"],
    ),
    Case(
        "unknown_pruner_mia",
        ATT,
        ["-1", DIGITS, "--pruner_name", "magnitude"],
        2,
        ["unknown pruner_name 'magnitude'", "iter_pruning"],
    ),
    prune_case("sparsity_one", ["--prune_sparsity", "1"], 2, ["--prune_sparsity", "[0, 1)", "1.0"]),
    attack_case("sparsity_negative_mia", ["--prune_sparsity", "-0.1"], 2, ["--prune_sparsity", "[0, 1)", "-0.1"]),
    Case(
        "prune_iter_zero",
        PRU,
        ["-1", DIGITS, "--pruner_name", "iter_prunetxt", "--prune_iter", "0"],
        2,
        ["--prune_iter", ">= 1", "got 0"],
    ),
    prune_case(
        "window_without_stride",
        ["--defend", "slide_re", "--width", "15"],
        2,
        ["--defend slide_re", "--stride", "--width", "--stride None"],
    ),
    prune_case(
        "window_not_positive",
        ["--defend", "slide", "--stride", "1", "--width", "0"],
        2,
        ["--defend slide", "at least 1", "--width 0"],
    ),
    prune_case(
        "mem_thre_outside_scores",
        ["--defend", "ml2", "--mem_thre", "5"],
        2,
        ["--mem_thre 5", "range [0.000, 0.900]", "inside"],
        write_memscores(np.linspace(0, 0.9, N_TRAIN)),
    ),
    prune_case(
        "dp_negative_noise",
        ["--defend", "dp", "--defend_arg", "-0.5"],
        2,
        ["--defend dp", "--defend_arg >= 0", "noise", "-0.5"],
    ),
    prune_case(
        "relaxloss_zero_alpha",
        ["--defend", "relaxloss", "--defend_arg", "0"],
        2,
        ["--defend relaxloss", "--defend_arg > 0"],
    ),
    Case(
        "pruner_does_not_fit_model",
        PRU,
        ["-1", os.path.join(REPO, "config", "cifar10_resnet18.json"), "--pruner_name", "iter_prunetxt"],
        2,
        ["iter_prunetxt", "fc1/fc2", "--pruner_name iter_pruning"],
    ),
    Case("mia_without_shadows", ATT, ["-1", DIGITS, *MIA[:2], "--shadow_num", "0"], 2, ["--shadow_num", ">= 1"]),
    attack_case("original_with_adaptive", ["--original", "--adaptive"], 2, ["--original", "drop --adaptive"]),
    pretrain_case(
        "force_with_skip_existing", ["--force", "--skip_existing"], 2, ["--force", "stale", "drop --skip_existing"]
    ),
    # data
    Case(
        "dataset_missing",
        PRE,
        ["-1", os.path.join(REPO, "config", "location.json")],
        1,
        ["data/datasets/location/data_complete.npz not found", "https://github.com/jjy1994/MemGuard"],
    ),
    Case(
        "dataset_wrong_columns",
        PRE,
        ["-1", PURCHASE],
        1,
        ["purchase100.txt has 10 columns, expected 601", "dataset_purchase.tgz"],
        write_purchase(purchase_rows(columns=10)),
    ),
    Case(
        "dataset_not_numeric",
        PRE,
        ["-1", PURCHASE],
        1,
        ["purchase100.txt", "not a comma-separated numeric table", "dataset_purchase.tgz"],
        write_purchase(purchase_rows(bad="x")),
    ),
    Case(
        "dataset_label_out_of_range",
        PRE,
        ["-1", PURCHASE],
        1,
        ["labels must be integers 1..100", "101", "dataset_purchase.tgz"],
        write_purchase(purchase_rows(label=101)),
    ),
    prune_case(
        "memscore_missing", [*SLIDE_RE], 1, ["memscore/memscore_digits_columnfc.csv not found", "compute_memscore.py"]
    ),
    prune_case(
        "memscore_wrong_length",
        [*SLIDE_RE],
        1,
        ["100 rows", f"{N_TRAIN} samples"],
        write_memscores(np.linspace(0, 1, 100)),
    ),
    prune_case(
        "memscore_not_numeric",
        [*SLIDE_RE],
        1,
        ["memscore_digits_columnfc.csv", "numeric"],
        write_memscores(["0.5"] * (N_TRAIN - 1) + ["high"]),
    ),
    # order of steps and stale or broken files
    prune_case("prune_before_pretrain", [], 1, ["split.npz not found", "run pretrain_modi.py"], remove("result")),
    prune_case(
        "prune_shadow_not_pretrained",
        [],
        1,
        ["shadow_model_0/best.pth not found", "pretrain_modi.py", "--shadow_num 1"],
        remove(f"{RUN}/shadow_model_0/best.pth"),
    ),
    Case(
        "prune_more_shadows_than_split",
        PRU,
        ["-1", DIGITS, "--pruner_name", "iter_prunetxt", "--shadow_num", "2"],
        2,
        ["the split has 1 shadows", "lower --shadow_num", "--force"],
    ),
    attack_case(
        "mia_before_prune",
        [],
        1,
        ["iter_prunetxt_0.6_model/best.pth not found", "prune_modi.py", "--pruner_name iter_prunetxt"],
        remove(f"{RUN}/iter_prunetxt_0.6_model", f"{RUN}/shadow_iter_prunetxt_0.6_model_0"),
    ),
    attack_case("mia_before_pretrain", [], 1, ["split.npz not found", "pretrain_modi.py"], remove("result")),
    attack_case(
        "adaptive_shadows_missing",
        ["--defend", "ppb", "--defend_arg", "4", "--adaptive"],
        1,
        [
            "shadow_iter_prunetxt_0.6_ppb_4.0_model_0/best.pth not found",
            "prune_modi.py",
            "--defend ppb --defend_arg 4.0",
        ],
        copy_folder(f"{RUN}/iter_prunetxt_0.6_model", f"{RUN}/iter_prunetxt_0.6_ppb_4.0_model"),
    ),
    attack_case(
        "adaptive_window_shadows_missing",
        ["--defend", "slide_re", "--adaptive"],
        1,
        ["shadow_iter_prunetxt_0.6_slide_re_model_0", "prune_modi.py", "--defend slide_re --stride"],
        copy_folder(f"{RUN}/iter_prunetxt_0.6_model", f"{RUN}/iter_prunetxt_0.6_slide_re_model"),
    ),
    prune_case(
        "checkpoint_for_other_num_cls",
        [],
        1,
        ["victim_model/best.pth does not fit", "fc3.weight", "another dataset/model/num_cls"],
        checkpoint_for_five_classes,
    ),
    attack_case(
        "checkpoint_truncated",
        [],
        1,
        ["iter_prunetxt_0.6_model/best.pth is corrupt", "delete it", "prune_modi.py"],
        truncate(f"{RUN}/iter_prunetxt_0.6_model/best.pth"),
    ),
    attack_case(
        "split_corrupt",
        [],
        1,
        ["split.npz is unreadable", "--force"],
        write_bytes(f"{RUN}/split.npz", b"not an npz at all"),
    ),
    prune_case(
        "split_of_another_program", [], 1, ["split.npz was not made by pretrain_modi.py", "--force"], foreign_split
    ),
    # seed 8 has its own namespace (result/digits_columnfc_seed8); a seed-7 split copied there is refused
    pretrain_case(
        "split_other_seed",
        ["--shadow_num", "1", "--seed", "8"],
        1,
        ["digits_columnfc_seed8/split.npz cannot be reused", "seed=7", "seed=8", "--force"],
        copy_folder(RUN, RUN + "_seed8"),
    ),
    pretrain_case(
        "split_too_few_shadows", ["--shadow_num", "2"], 1, ["cannot be reused", "1 shadows", "asks for 2", "--force"]
    ),
    pretrain_case(
        "output_folder_is_a_file",
        ["--shadow_num", "1"],
        1,
        ["cannot read or write result/digits_columnfc", "Not a directory", "permissions"],
        result_is_a_file,
    ),
]


def snapshot(folder):
    """relative path -> sha256 of every file under folder."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def prepare(case, pretrained, folder):
    shutil.copytree(pretrained, folder, dirs_exist_ok=True)
    if case.setup is not None:
        case.setup(folder)
    return snapshot(folder)


# ---------------------------------------------------------------- the cases through a fork server
# Starting python and importing torch costs seconds per run, the failing part milliseconds: the cases run as
# forked children of tests/script_server.py (helpers.run_forked), each case folder being the repo of its
# run. test_fork_server_matches_a_real_run checks that this is `python script ...` minus the start-up.


@pytest.fixture(scope="module")
def outcomes(pretrained, tmp_path_factory):
    """case name -> (completed run, files before, files after), each case in its own copy of the tiny run."""
    results = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case.name)
        before = prepare(case, pretrained, folder)
        proc = run_forked(case.script, *case.args, cwd=folder, repo=folder)
        results[case.name] = proc, before, snapshot(folder)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_is_one_line_and_changes_nothing(case, outcomes):
    proc, before, after = outcomes[case.name]
    lines = proc.stderr.splitlines()
    assert proc.returncode == case.status, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 20, proc.stderr
    for word in case.words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert after == before, "a failed run changed the files of the earlier steps"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["config_invalid_json", "checkpoint_truncated"])
def test_fork_server_matches_a_real_run(name, outcomes, pretrained, tmp_path):
    """The same case through `python script ...` gives the same status, stderr and files."""
    case = next(case for case in CASES if case.name == name)
    before = prepare(case, pretrained, tmp_path)
    real = run_script(case.script, *case.args, cwd=tmp_path, check=False, repo=tmp_path)
    forked, _, _ = outcomes[name]
    assert (real.returncode, real.stderr) == (forked.returncode, forked.stderr)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_every_case_hits_its_own_check(outcomes):
    """No two cases of one script end in the same error line: each exercises a check of its own, and the
    line says what is specific to it."""
    seen = {}
    for case in CASES:
        line = outcomes[case.name][0].stderr.strip()
        assert (case.script, line) not in seen, f"{case.name} and {seen[case.script, line]} both give {line!r}"
        seen[case.script, line] = case.name


@pytest.mark.slow
def test_cpu_said_once(pretrained, tmp_path):
    shutil.copytree(pretrained, tmp_path, dirs_exist_ok=True)
    flags = ["--shadow_num", "1", "--skip_existing", "--no_tensorboard"]
    proc = run_forked("pretrain_modi.py", "-1", DIGITS, *flags, cwd=tmp_path, repo=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Running on CPU") == 1 and "GPU-ID is -1" in proc.stdout


def test_gpu_id_that_does_not_exist_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"GPU-ID 2 does not exist \(2 CUDA device\(s\) visible\); pass 0..1, or -1"):
        pick_device(2)
    assert UsageError.exit_code == 2
    assert pick_device(1) == torch.device("cuda:1")
