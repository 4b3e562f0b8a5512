"""Completion records: a step refuses the models of a step before it that did not finish."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_script

DIGITS = os.path.join(REPO, "config", "digits.json")
RUN = os.path.join("result", "digits_columnfc")
PRETRAIN = ["pretrain_modi.py", "-1", DIGITS, "--epochs", "2", "--shadow_num", "2", "--no_tensorboard"]
PRUNE = ["prune_modi.py", "-1", DIGITS, "--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "2",
         "--shadow_num", "2", "--no_tensorboard"]
ATTACK = ["mia_modi.py", "-1", DIGITS, "--pruner_name", "iter_prunetxt", "--shadow_num", "2", "--attacks", "threshold",
          "--no_tensorboard"]
PRUNE_FIX = (f"run prune_modi.py -1 {DIGITS} --pruner_name iter_prunetxt --prune_sparsity 0.6 --shadow_num 2 first")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    run_script(*PRETRAIN, cwd=folder)
    run_script(*PRUNE, cwd=folder)
    return folder


def copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_every_model_gets_a_record_naming_its_checkpoint(finished):
    import hashlib
    for folder in ["victim_model", "shadow_model_0", "shadow_model_1", "iter_prunetxt_0.6_model",
                   "shadow_iter_prunetxt_0.6_model_0", "shadow_iter_prunetxt_0.6_model_1"]:
        record = json.loads((finished / RUN / folder / "complete.json").read_text())
        digest = hashlib.sha256((finished / RUN / folder / "best.pth").read_bytes()).hexdigest()
        assert record["checkpoint_sha256"] == digest
        if folder.startswith(("iter", "shadow_iter")):
            assert record["script"] == "prune_modi.py" and record["target_sparsity"] == 0.6
            assert record["sparsity"] == pytest.approx(0.6, abs=1e-3)
        else:
            assert record["script"] == "pretrain_modi.py" and record["epoch"] in (0, 1)


def test_attack_refuses_a_shadow_without_record(finished, tmp_path):
    folder = copy(finished, tmp_path)
    os.remove(folder / RUN / "shadow_iter_prunetxt_0.6_model_1" / "complete.json")
    logs = sorted((folder / "log").rglob("*.txt"))
    before = {p: p.read_bytes() for p in logs}
    proc = run_script(*ATTACK, cwd=folder, check=False)
    path = f"{RUN}/shadow_iter_prunetxt_0.6_model_1"
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: {path}/best.pth belongs to a run that did not finish (no {path}/complete.json: it was killed or "
        f"is still running); {PRUNE_FIX}"]
    assert {p: p.read_bytes() for p in logs} == before  # nothing logged


def test_attack_refuses_a_checkpoint_changed_after_its_record(finished, tmp_path):
    folder = copy(finished, tmp_path)
    best = folder / RUN / "iter_prunetxt_0.6_model" / "best.pth"
    shutil.copy(folder / RUN / "shadow_iter_prunetxt_0.6_model_0" / "best.pth", best)  # a newer, other model
    proc = run_script(*ATTACK, cwd=folder, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {RUN}/iter_prunetxt_0.6_model/best.pth changed after its run finished")


def test_a_killed_prune_is_refused_downstream(finished, tmp_path):
    """SIGKILL prune_modi.py once the victim is done: its shadows hold a half-pruned or an older model,
    and the attack names the unfinished run instead of attacking it."""
    folder = copy(finished, tmp_path)
    victim_record = folder / RUN / "iter_prunetxt_0.6_model" / "complete.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, PRUNE[0]), *PRUNE[1:], "--prune_epochs", "30", "--early_stop", "0"]
    old_victim = victim_record.read_text()
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (victim_record.exists() and victim_record.read_text() != old_victim):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert victim_record.exists() and victim_record.read_text() != old_victim  # the victim finished anew
    assert not (folder / RUN / "shadow_iter_prunetxt_0.6_model_1" / "complete.json").exists()
    attack = run_script(*ATTACK, cwd=folder, check=False)
    assert attack.returncode == 1 and "did not finish" in attack.stderr and "shadow_iter_prunetxt_0.6_model_" in attack.stderr


def test_prune_refuses_an_unfinished_pretrained_model_and_skip_existing_retrains_it(finished, tmp_path):
    folder = copy(finished, tmp_path)
    os.remove(folder / RUN / "shadow_model_1" / "complete.json")  # as a pretraining killed in shadow 1 leaves it
    proc = run_script(*PRUNE, cwd=folder, check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {RUN}/shadow_model_1/best.pth belongs to a run that did not finish (no {RUN}/shadow_model_1/"
        f"complete.json: it was killed or is still running); run pretrain_modi.py -1 {DIGITS} --shadow_num 2 first"]
    proc = run_script(*PRETRAIN, "--skip_existing", cwd=folder)
    assert "Skipping victim" in proc.stdout and "Skipping shadow 0" in proc.stdout
    assert "Skipping shadow 1" not in proc.stdout  # retrained: it had no record
    assert (folder / RUN / "shadow_model_1" / "complete.json").exists()
    run_script(*PRUNE, cwd=folder)
