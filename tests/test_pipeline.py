"""End to end on digits: pretrain -> prune (Base, iter_prunetxt) -> attacks, as a user runs them.

pretrain, prune and a `threshold` attack run as subprocesses in a temporary folder, exactly as a
user types them. Later steps call the scripts' main() in-process (same code, no second torch
start-up): every attack at once with attacks.ATTACK_EPOCHS lowered (at 100 epochs the four attack
models take minutes on a busy CPU), `--original`, and a second pretraining for the split check.
"""

import os
import re

import pytest
import torch

import attacks
from conftest import REPO
from datasets import TensorData, get_dataset
from helpers import run_main, run_scripts
from models import build_model
from splits import Split
from train import evaluate, load_checkpoint

pytestmark = pytest.mark.slow  # runs the scripts end to end

CONFIG = os.path.join(REPO, "config", "digits.json")
RUN = "digits_columnfc"
STEM = "iter_prunetxt_0.6"
NUM = r"(\d+\.\d{3})"
PRUNE = ["--pruner_name", "iter_prunetxt", "--prune_sparsity", "0.6"]
ALL_ATTACKS = "threshold,samia,nn,nn_top3,nn_cls"
ATTACK_LINES = ["SAMIA", "Conf", "Entr", "Mentr", "Hconf", "NN", "Top3-NN", "NNCl"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One pipeline run shared by the tests below: pretrain, prune, attack (threshold) on the CLI."""
    cwd = tmp_path_factory.mktemp("pipeline")
    run_scripts(
        ("pretrain_modi.py", -1, CONFIG, "--epochs", 3, "--shadow_num", 2),
        ("prune_modi.py", -1, CONFIG, *PRUNE, "--prune_iter", 3, "--prune_epochs", 2, "--shadow_num", 2),
        ("mia_modi.py", -1, CONFIG, *PRUNE, "--attacks", "threshold", "--shadow_num", 2),
        cwd=cwd,
    )
    return cwd


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def match_in_order(lines, patterns):
    """Match each regex to a later line than the previous one (other lines may sit between).
    Returns the match objects; fails naming the first pattern not found."""
    found, pos = [], 0
    for pattern in patterns:
        for i in range(pos, len(lines)):
            m = re.fullmatch(pattern, lines[i])
            if m:
                found.append(m)
                pos = i + 1
                break
        else:
            pytest.fail(f"no line matching {pattern!r} after line {pos} in:\n" + "\n".join(lines))
    return found


def percent(m, group=1):
    value = float(m.group(group))
    assert 0 <= value <= 100
    return value


def victim_test_accuracy(cwd, folder, monkeypatch):
    """Accuracy of folder/best.pth on the victim's test split, recomputed here."""
    monkeypatch.chdir(cwd)
    train, test = get_dataset("digits")
    data = TensorData.concat(train, test)
    split = Split.load(os.path.join("result", RUN, "split.npz"))
    model = build_model("columnfc", 10, 64)
    load_checkpoint(model, os.path.join("result", RUN, folder, "best.pth"), "checkpoint", "")
    return evaluate(model, data, split.indices().test)


def test_every_file_exists(run_dir):
    result = run_dir / "result" / RUN
    expected = ["split.npz", "victim_model/best.pth"] + [f"shadow_model_{i}/best.pth" for i in range(2)]
    for folder in [f"{STEM}_model"] + [f"shadow_{STEM}_model_{i}" for i in range(2)]:
        expected += [f"{folder}/best.pth", f"{folder}/best_mask.pth"]
    missing = [p for p in expected if not (result / p).is_file()]
    assert not missing
    assert (run_dir / "log" / RUN / "pretrain.txt").is_file()
    assert (run_dir / "log" / RUN / f"{STEM}_base.txt").is_file()
    assert not (run_dir / "result" / RUN / "shadow_model_2").exists()


def test_pretrain_log(run_dir, monkeypatch):
    lines = read_lines(run_dir / "log" / RUN / "pretrain.txt")
    pattern = r"Pretrained {}: epoch ([0-2]), dev Accuracy {n}, test Accuracy {n}, Loss {n}"
    found = match_in_order(
        lines,
        [rf"{RUN} pretrain seed 7 epochs 3"]
        + [pattern.format(who, n=NUM) for who in ("victim", "shadow 0", "shadow 1")],
    )
    for m, folder in zip(found[1:], ["victim_model", "shadow_model_0", "shadow_model_1"]):
        ckpt = torch.load(run_dir / "result" / RUN / folder / "best.pth", weights_only=True)
        assert int(m.group(1)) == ckpt["epoch"] and float(m.group(2)) == pytest.approx(ckpt["acc"], abs=5e-4)
    acc, loss = victim_test_accuracy(run_dir, "victim_model", monkeypatch)
    assert (float(found[1].group(3)), float(found[1].group(4))) == (round(acc, 3), round(loss, 3))


def prune_patterns():
    iters = lambda who: [rf"{who} iter {t} best model: Accuracy {NUM}, Loss {NUM}" for t in range(3)]
    return (
        [rf"{RUN}_{STEM}_0\.0005", rf"Pretrained Victim: Accuracy {NUM}, Loss {NUM}"]
        + iters("victim")
        + [r"Total Base defend time: (\d+\.\d{3})s"]
        + iters("shadow 0")
        + iters("shadow 1")
    )


def test_prune_log_and_exports(run_dir, monkeypatch):
    lines = read_lines(run_dir / "log" / RUN / f"{STEM}_base.txt")
    found = match_in_order(lines, prune_patterns())
    assert lines[0] == f"{RUN}_{STEM}_0.0005"
    assert lines[1] == "Semantics: release"  # the default --semantics, said in the block's header
    acc, loss = victim_test_accuracy(run_dir, "victim_model", monkeypatch)
    assert (percent(found[1]), float(found[1].group(2))) == (round(acc, 3), round(loss, 3))
    for m in found[2:5] + found[6:]:
        percent(m)
        assert float(m.group(2)) > 0
    assert 0 < float(found[5].group(1)) < 600

    # the last iteration's export is at the target sparsity, on fc1/fc2 only, loadable by the plain model
    for folder in [f"{STEM}_model"] + [f"shadow_{STEM}_model_{i}" for i in range(2)]:
        masks = torch.load(run_dir / "result" / RUN / folder / "best_mask.pth", weights_only=True)
        state = torch.load(run_dir / "result" / RUN / folder / "best.pth", weights_only=True)["state"]
        assert set(masks) == {"fc1", "fc2"}
        for name, mask in masks.items():
            assert int((mask == 0).sum()) == int(mask.numel() * 0.6)
            assert torch.equal(state[f"{name}.weight"] == 0, mask == 0)
        assert int((state["fc3.weight"] == 0).sum()) == 0


def test_attack_log_from_the_command_line(run_dir, monkeypatch):
    lines = read_lines(run_dir / "log" / RUN / f"{STEM}_base.txt")
    names = ["Conf", "Entr", "Mentr", "Hconf"]
    found = match_in_order(
        lines,
        prune_patterns()
        + [rf"Victim pruned model test accuracy: {NUM}", rf"Shadows: {STEM} \(base\)"]
        + [rf"{name} attack accuracy: {NUM}" for name in names],
    )
    attack = found[len(prune_patterns()) :]
    assert lines[lines.index(f"Shadows: {STEM} (base)") + 1] == "Semantics: release"
    acc, _ = victim_test_accuracy(run_dir, f"{STEM}_model", monkeypatch)
    assert percent(attack[0]) == round(acc, 3)
    for m in attack[2:]:
        percent(m)
    assert not any(line.startswith(("SAMIA", "NN")) for line in lines)  # only what --attacks asked for


def test_every_attack_and_original(run_dir, monkeypatch):
    log = run_dir / "log" / RUN / f"{STEM}_base.txt"
    before = len(read_lines(log))
    monkeypatch.setattr(attacks, "ATTACK_EPOCHS", 3)
    run_main("mia_modi", [-1, CONFIG, *PRUNE, "--attacks", ALL_ATTACKS, "--shadow_num", 2], run_dir, monkeypatch)
    run_main(
        "mia_modi",
        [-1, CONFIG, *PRUNE, "--attacks", "threshold", "--shadow_num", 2, "--original"],
        run_dir,
        monkeypatch,
    )
    new = read_lines(log)[before:]
    found = match_in_order(
        new,
        [rf"Victim pruned model test accuracy: {NUM}", rf"Shadows: {STEM} \(base\)"]
        + [rf"{name} attack accuracy: {NUM}" for name in ATTACK_LINES]
        + [rf"Victim original model test accuracy: {NUM}", r"Shadows: original"]
        + [rf"{name} attack accuracy: {NUM}" for name in ("Conf", "Entr", "Mentr", "Hconf")],
    )
    for m in found[2:10] + found[12:]:
        percent(m)
    for name in ATTACK_LINES:  # each attack reported once per run, in the fixed order above
        assert sum(line.startswith(f"{name} attack accuracy:") for line in new) == (
            2 if "onf" in name or "ntr" in name else 1
        )
    original, _ = victim_test_accuracy(run_dir, "victim_model", monkeypatch)
    assert percent(found[10]) == round(original, 3)


def test_split_is_byte_identical_across_runs(run_dir, tmp_path, monkeypatch):
    run_main("pretrain_modi", [-1, CONFIG, "--epochs", 1, "--shadow_num", 2], tmp_path, monkeypatch)
    first = (run_dir / "result" / RUN / "split.npz").read_bytes()
    assert (tmp_path / "result" / RUN / "split.npz").read_bytes() == first


def test_attack_record_holds_bootstrap_intervals_of_the_logged_numbers(run_dir, monkeypatch):
    """Each attack's record entry holds 95 % intervals that the saved per-sample data reproduce, and the
    accuracy's interval is around the logged accuracy (balanced for thresholds, plain for NN)."""
    import glob
    import json

    import numpy as np

    from intervals import Attacked, bootstrap, read_attacked

    monkeypatch.setattr(attacks, "ATTACK_EPOCHS", 3)
    run_main(
        "mia_modi",
        [-1, CONFIG, *PRUNE, "--attacks", "threshold,nn", "--shadow_num", 2, "--bootstrap", 200],
        run_dir,
        monkeypatch,
    )
    path = max(glob.glob(str(run_dir / "result" / RUN / "records" / "attack_*.json")), key=os.path.getmtime)
    with open(path) as f:
        record = json.load(f)
    assert record["results"]["bootstrap"] == {"resamples": 200, "seed": 7, "level": 0.95}
    index, runs = read_attacked(record["scores"], attacks._rankable)
    with np.load(record["scores"]) as z:
        member = z["member"]
    assert record["results"]["members"] == member.sum() and record["results"]["nonmembers"] == (~member).sum()
    kinds = {"Conf": "balanced", "Entr": "balanced", "Mentr": "balanced", "Hconf": "balanced", "NN": "plain"}
    for entry in record["results"]["attacks"]:
        run = runs[entry["name"]]
        assert run.accuracy_kind == kinds[entry["name"]] and len(run.decisions) == len(member)
        again = bootstrap(Attacked(run.scores, run.member, run.accuracy_kind, run.decisions), 200, 7)
        assert round(again["accuracy"][0], 3) == entry["accuracy"]
        for metric, (low, high) in entry["intervals"].items():
            assert [low, high] == [again[metric][1], again[metric][2]]
        assert entry["intervals"]["accuracy"][0] <= entry["accuracy"] <= entry["intervals"]["accuracy"][1]
