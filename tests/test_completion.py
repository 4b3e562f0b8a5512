"""Completion records and staging: a step refuses the models of a step before it that did not finish, a killed
run leaves the last finished models in place, and a pruned model must be what its mask says."""

import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import run_script
from helpers import (
    DIGITS,
    attack_cmd,
    copy_run,
    pretrain_cmd,
    prune_cmd,
    run_forked,
    run_scripts,
    start_script,
    wait_for,
)

pytestmark = pytest.mark.slow  # runs the scripts end to end

RUN = os.path.join("result", "digits_columnfc")
PRETRAIN = pretrain_cmd(2, 2)
PRUNE = prune_cmd(2, 2, "--no_tensorboard")
ATTACK = attack_cmd(2, "--no_tensorboard")
PRUNE_FIX = f"run prune_modi.py -1 {DIGITS} --pruner_name iter_prunetxt --prune_sparsity 0.6 --shadow_num 2 first"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    run_scripts(PRETRAIN, PRUNE, cwd=folder)
    return folder


def test_every_model_gets_a_record_naming_its_checkpoint(finished):
    import hashlib

    for folder in [
        "victim_model",
        "shadow_model_0",
        "shadow_model_1",
        "iter_prunetxt_0.6_model",
        "shadow_iter_prunetxt_0.6_model_0",
        "shadow_iter_prunetxt_0.6_model_1",
    ]:
        record = json.loads((finished / RUN / folder / "complete.json").read_text())
        digest = hashlib.sha256((finished / RUN / folder / "best.pth").read_bytes()).hexdigest()
        assert record["checkpoint_sha256"] == digest
        if folder.startswith(("iter", "shadow_iter")):
            assert record["script"] == "prune_modi.py" and record["target_sparsity"] == 0.6
            assert record["sparsity"] == pytest.approx(0.6, abs=1e-3)
        else:
            assert record["script"] == "pretrain_modi.py" and record["epoch"] in (0, 1)


def test_attack_refuses_a_shadow_without_record(finished, tmp_path):
    folder = copy_run(finished, tmp_path)
    os.remove(folder / RUN / "shadow_iter_prunetxt_0.6_model_1" / "complete.json")
    logs = sorted((folder / "log").rglob("*.txt"))
    before = {p: p.read_bytes() for p in logs}
    proc = run_forked(*ATTACK, cwd=folder)
    path = f"{RUN}/shadow_iter_prunetxt_0.6_model_1"
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: {path}/best.pth belongs to a run that did not finish (no {path}/complete.json: it was killed or "
        f"is still running); {PRUNE_FIX}"
    ]
    assert {p: p.read_bytes() for p in logs} == before  # nothing logged


def test_attack_refuses_a_checkpoint_changed_after_its_record(finished, tmp_path):
    folder = copy_run(finished, tmp_path)
    best = folder / RUN / "iter_prunetxt_0.6_model" / "best.pth"
    shutil.copy(folder / RUN / "shadow_iter_prunetxt_0.6_model_0" / "best.pth", best)  # a newer, other model
    proc = run_forked(*ATTACK, cwd=folder)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {RUN}/iter_prunetxt_0.6_model/best.pth changed after its run finished")


def model_files(folder):
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted((folder / RUN).glob("*_model*/*"))
        if ".partial-" not in p.parent.name
    }


INTERRUPTED = (
    "error: interrupted ({}); every checkpoint in result/ is still a finished one (this run's unfinished "
    "models were discarded); rerun the command to redo this step"
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_prune_leaves_the_finished_models(finished, tmp_path, sig):
    """Kill prune_modi.py once its new victim has improved: every model folder still holds the last finished
    run's files (byte for byte), and the attack takes them. SIGTERM/SIGINT discard the staged folders on the
    way out; SIGKILL leaves one, which the next prune run removes."""
    folder = copy_run(finished, tmp_path)
    before = model_files(folder)
    proc = start_script(*PRUNE, "--prune_epochs", "30", "--early_stop", "0", cwd=folder, stdout=subprocess.DEVNULL)
    staged = lambda: list((folder / RUN).glob("iter_prunetxt_0.6_model.partial-*/best.pth"))
    wait_for(staged, 300, proc)
    assert staged(), "the victim never improved"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert model_files(folder) == before
    left = sorted(p.name for p in (folder / RUN).glob("*.partial-*"))
    if sig == signal.SIGKILL:
        names = ["iter_prunetxt_0.6_model", "shadow_iter_prunetxt_0.6_model_0", "shadow_iter_prunetxt_0.6_model_1"]
        assert proc.returncode == -signal.SIGKILL
        assert left == [f"{name}.partial-{os.uname().nodename}-{proc.pid}" for name in names]
    else:
        assert (proc.returncode, stderr.splitlines()) == (
            (143, [INTERRUPTED.format("SIGTERM")]) if sig == signal.SIGTERM else (130, [INTERRUPTED.format("Ctrl-C")])
        )
        assert left == []
    attack = run_forked(*ATTACK, cwd=folder)
    assert attack.returncode == 0, attack.stderr
    if sig == signal.SIGKILL:
        run_script(*PRUNE, cwd=folder)  # a dead run's staged folder is removed by the next run
        assert list((folder / RUN).glob("*.partial-*")) == []
        assert model_files(folder) != before


def test_a_rebuilt_split_makes_the_models_trained_on_the_old_one_stale(finished, tmp_path):
    """pretrain_modi.py --force rebuilds the split: the models trained on the old one are refused, not taken."""
    from splits import Split

    folder = copy_run(finished, tmp_path)
    Split.create("digits", 539, 1258, 7, 3).save(str(folder / RUN / "split.npz"))  # what --force --shadow_num 3 writes
    proc = run_forked(*PRUNE, cwd=folder)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: {RUN}/victim_model/best.pth was trained on another data split than {RUN}/split.npz (the split was "
        f"rebuilt after it finished); run pretrain_modi.py -1 {DIGITS} --shadow_num 2 first"
    ]
    attack = run_forked(*ATTACK, cwd=folder)
    assert attack.returncode == 1 and "was trained on another data split" in attack.stderr


def release_copy(folder, source, target):
    """target/best.pth as the release writes it (a plain state_dict, no completion record), made from source's
    checkpoint, with source's mask."""
    import torch

    shutil.rmtree(folder / RUN / target)
    (folder / RUN / target).mkdir()
    state = torch.load(folder / RUN / source / "best.pth", weights_only=True)
    torch.save(state.get("state", state), folder / RUN / target / "best.pth")
    mask = folder / RUN / source / "best_mask.pth"
    if mask.exists():
        shutil.copy(mask, folder / RUN / target / "best_mask.pth")


def test_attack_refuses_a_dense_checkpoint_in_a_pruned_folder(finished, tmp_path):
    folder = copy_run(finished, tmp_path)
    shutil.copy(folder / RUN / "iter_prunetxt_0.6_model" / "best_mask.pth", tmp_path / "mask.pth")
    release_copy(folder, "victim_model", "iter_prunetxt_0.6_model")
    shutil.copy(tmp_path / "mask.pth", folder / RUN / "iter_prunetxt_0.6_model" / "best_mask.pth")
    logs = {p: p.read_bytes() for p in (folder / "log").rglob("*.txt")}
    proc = run_forked(*ATTACK, cwd=folder)
    path = f"{RUN}/iter_prunetxt_0.6_model"
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
        f"error: {path}/best.pth is not pruned as its mask {path}/best_mask.pth says (masked weights of fc1 are not "
        f"zero: a dense or another run's checkpoint); {PRUNE_FIX}"
    )
    assert {p: p.read_bytes() for p in (folder / "log").rglob("*.txt")} == logs


def test_attack_refuses_a_model_pruned_to_another_sparsity(finished, tmp_path):
    folder = copy_run(finished, tmp_path)
    for source, target in [("iter_prunetxt_0.6_model", "iter_prunetxt_0.5_model")] + [
        (f"shadow_iter_prunetxt_0.6_model_{i}", f"shadow_iter_prunetxt_0.5_model_{i}") for i in range(2)
    ]:
        (folder / RUN / target).mkdir()
        release_copy(folder, source, target)
    proc = run_forked(*ATTACK, "--prune_sparsity", "0.5", cwd=folder)
    path = f"{RUN}/iter_prunetxt_0.5_model"
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith(
        f"error: {path}/best_mask.pth prunes 0.600 of the weights, not the requested --prune_sparsity 0.5; "
    )


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--prune_iter", "1"],
            "error: --prune_iter must be >= 2 for iter_prunetxt (its first iteration prunes nothing, "
            "the last reaches --prune_sparsity), got 1; the paper uses 5",
        ),
    ],
)
def test_prune_refuses_one_iteration(finished, tmp_path, flags, line):
    folder = copy_run(finished, tmp_path)
    before = model_files(folder)
    proc = run_forked(*PRUNE, *flags, cwd=folder)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [line])
    assert model_files(folder) == before


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--adaptive"],
            "error: --adaptive uses shadows pruned with the victim's defense, and there is none; add "
            "--defend NAME, or drop --adaptive for Base",
        ),
        (
            ["--original", "--defend", "ppb"],
            "error: --original attacks the unpruned models, which have no defense; drop --defend ppb",
        ),
    ],
)
def test_attack_refuses_flags_that_would_be_logged_as_something_else(finished, tmp_path, flags, line):
    folder = copy_run(finished, tmp_path)
    logs = {p: p.read_bytes() for p in (folder / "log").rglob("*.txt")}
    proc = run_forked(*ATTACK, *flags, cwd=folder)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [line])
    assert {p: p.read_bytes() for p in (folder / "log").rglob("*.txt")} == logs


def test_prune_refuses_an_unfinished_pretrained_model_and_skip_existing_retrains_it(finished, tmp_path):
    folder = copy_run(finished, tmp_path)
    os.remove(folder / RUN / "shadow_model_1" / "complete.json")  # as a pretraining killed in shadow 1 leaves it
    proc = run_forked(*PRUNE, cwd=folder)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {RUN}/shadow_model_1/best.pth belongs to a run that did not finish (no {RUN}/shadow_model_1/"
        f"complete.json: it was killed or is still running); run pretrain_modi.py -1 {DIGITS} --shadow_num 2 first"
    ]
    proc = run_script(*PRETRAIN, "--skip_existing", cwd=folder)
    assert "Skipping victim" in proc.stdout and "Skipping shadow 0" in proc.stdout
    assert "Skipping shadow 1" not in proc.stdout  # retrained: it had no record
    assert (folder / RUN / "shadow_model_1" / "complete.json").exists()
    run_script(*PRUNE, cwd=folder)
