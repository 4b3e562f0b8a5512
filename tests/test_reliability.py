"""No lost work and safe reruns: an interrupted save keeps the previous file, a Ctrl-C leaves loadable
checkpoints, reruns reuse the split, append to logs and (with --skip_existing) keep finished models,
and the same seed and command give the same files and numbers in any folder."""

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from common import atomic_write, check_writable
from conftest import run_script
from gridrun import step as grid_step
from helpers import attack_cmd, pretrain_cmd, prune_cmd, wait_for
from models import build_model
from splits import Split
from train import load_checkpoint, save_checkpoint

RUN = "result/digits_columnfc"
PRETRAIN = pretrain_cmd(2, 1)
PRUNE = prune_cmd(2, 1, "--no_tensorboard")
ATTACK = attack_cmd(1)
PRUNE_LOG = "log/digits_columnfc/iter_prunetxt_0.6_base.txt"
PRETRAIN_LOG = "log/digits_columnfc/pretrain.txt"
RUN_ID = re.compile(r"\d{8}T\d{12}Z_[\w-]+_\d+")  # start time, host, pid: in run records' and scores' names


def run_pipeline(folder):
    for command in (PRETRAIN, PRUNE, ATTACK):
        run_script(*command, cwd=folder)
    return folder


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same tiny digits pipeline run twice, in two folders, side by side."""
    folders = [tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(run_pipeline, folders))


def files(folder):
    return sorted(RUN_ID.sub("<run id>", str(p.relative_to(folder))) for p in folder.rglob("*") if p.is_file())


def read(folder, path):
    return (folder / path).read_bytes()


def without_times(text):
    return [RUN_ID.sub("<run id>", line) for line in text.splitlines() if "defend time" not in line]


def tensors_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


# ---------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_seed_same_files_and_numbers(twins):
    a, b = twins
    assert files(a) == files(b)
    assert {f"{RUN}/split.npz", PRETRAIN_LOG} < set(files(a))  # (the data's split cache is the repo's)
    assert len([p for p in files(a) if p.endswith(".pth")]) == 6  # victim + shadow: pretrained, pruned, masks
    records = [p for p in files(a) if p.endswith("complete.json")]
    assert len(records) == 4  # victim + shadow, pretrained and pruned: each finished once
    for path in files(a):
        if path in records:  # they say when the model finished; all else in them is the same
            untimed = [{k: v for k, v in json.loads(read(x, path)).items() if k != "finished"} for x in (a, b)]
            assert untimed[0] == untimed[1], path
        elif path != PRUNE_LOG and "<run id>" not in path:  # the other files with a time in them
            assert read(a, path) == read(b, path), path
    (scores_a,), (scores_b,) = ((x / RUN / "scores").glob("*.npz") for x in (a, b))
    with np.load(scores_a) as za, np.load(scores_b) as zb:
        assert za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)
    log_a, log_b = (without_times((x / PRUNE_LOG).read_text()) for x in (a, b))
    assert log_a == log_b
    assert any(line.startswith("Conf attack accuracy: ") for line in log_a)
    assert sum("best model: Accuracy" in line for line in log_a) == 4  # 2 iterations x (victim, shadow)


# ---------------------------------------------------------------- reruns


@pytest.mark.slow
def test_pretrain_rerun_reuses_split_skips_finished_models_and_appends(twins, tmp_path):
    shutil.copytree(twins[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / RUN / "shadow_model_0/best.pth").unlink()  # as if killed while training shadow 0
    victim, split, old_log = (
        read(tmp_path, p) for p in (f"{RUN}/victim_model/best.pth", f"{RUN}/split.npz", PRETRAIN_LOG)
    )
    proc = run_script(*PRETRAIN, "--skip_existing", cwd=tmp_path)
    assert f"Reusing data split {RUN}/split.npz" in proc.stdout
    assert f"Skipping victim: {RUN}/victim_model/best.pth exists (--skip_existing)" in proc.stdout
    assert "Skipping shadow 0" not in proc.stdout
    assert read(tmp_path, f"{RUN}/victim_model/best.pth") == victim
    assert read(tmp_path, f"{RUN}/split.npz") == split
    # each model is seeded on its own, so the retrained shadow equals the one of the full run
    assert read(tmp_path, f"{RUN}/shadow_model_0/best.pth") == read(twins[0], f"{RUN}/shadow_model_0/best.pth")
    new_log = read(tmp_path, PRETRAIN_LOG)
    assert new_log.startswith(old_log)
    shadow_line = [line for line in old_log.decode().splitlines() if line.startswith("Pretrained shadow 0")]
    assert new_log[len(old_log) :].decode().splitlines()[1:] == shadow_line


@pytest.mark.slow
def test_prune_rerun_overwrites_checkpoints_and_appends_to_the_log(twins, tmp_path):
    shutil.copytree(twins[0], tmp_path, dirs_exist_ok=True)
    pruned = tmp_path / RUN / "iter_prunetxt_0.6_model/best.pth"
    old_log, old_mtime = (tmp_path / PRUNE_LOG).read_text(), pruned.stat().st_mtime_ns
    time.sleep(0.01)
    run_script(*PRUNE, cwd=tmp_path)
    new_log = (tmp_path / PRUNE_LOG).read_text()
    assert new_log.startswith(old_log)
    old_lines = without_times(old_log)
    prune_block = old_lines[: next(i for i, line in enumerate(old_lines) if line.startswith("Victim pruned"))]
    assert without_times(new_log[len(old_log) :]) == prune_block  # the same numbers again, appended
    assert pruned.stat().st_mtime_ns > old_mtime
    assert pruned.read_bytes() == read(twins[0], f"{RUN}/iter_prunetxt_0.6_model/best.pth")
    assert not [p for p in files(tmp_path) if ".tmp_" in p]


# ---------------------------------------------------------------- kill safety


def write_half_and_die(f, write, exception):
    """What a kill in the middle of a save leaves: the first half of the real bytes, then `exception`."""
    buffer = io.BytesIO()
    write(buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    raise exception("simulated kill during the write")


@pytest.mark.parametrize("exception, seen", [(RuntimeError, OSError), (KeyboardInterrupt, KeyboardInterrupt)])
def test_interrupted_checkpoint_save_keeps_the_previous_best(tmp_path, monkeypatch, exception, seen):
    """torch.save's write failure (RuntimeError) reaches the caller as an OSError naming the file."""
    path = str(tmp_path / "victim_model/best.pth")
    first = build_model("columnfc", 10, 64)
    save_checkpoint(path, first, 3, 81.5, 0.4)
    before = (tmp_path / "victim_model/best.pth").read_bytes()
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: write_half_and_die(f, lambda b: real(obj, b), exception))
    with pytest.raises(seen, match="simulated kill") as caught:
        save_checkpoint(path, build_model("columnfc", 10, 64), 4, 90.0, 0.3)
    if seen is OSError:
        assert caught.value.filename == path
    monkeypatch.undo()
    assert (tmp_path / "victim_model/best.pth").read_bytes() == before
    assert os.listdir(tmp_path / "victim_model") == ["best.pth"]  # no temp file left behind
    model = build_model("columnfc", 10, 64)
    ckpt = load_checkpoint(model, path, "checkpoint", "rerun")
    assert (ckpt["epoch"], ckpt["acc"]) == (3, 81.5)
    assert tensors_equal(model.state_dict(), first.state_dict())


@pytest.mark.parametrize("exception", [OSError, KeyboardInterrupt])
def test_interrupted_split_save_keeps_the_previous_split(tmp_path, monkeypatch, exception):
    path = str(tmp_path / "split.npz")
    Split.create("digits", 1437, 360, 7, 2).save(path)
    before = (tmp_path / "split.npz").read_bytes()
    real = np.savez
    monkeypatch.setattr(np, "savez", lambda f, **arrays: write_half_and_die(f, lambda b: real(b, **arrays), exception))
    with pytest.raises(exception, match="simulated kill"):
        Split.create("digits", 1437, 360, 8, 2).save(path)
    monkeypatch.undo()
    assert (tmp_path / "split.npz").read_bytes() == before
    assert os.listdir(tmp_path) == ["split.npz"]
    assert Split.load(path).meta["seed"] == 7


def test_a_temp_file_left_by_a_write_killed_with_9_goes_with_the_next_write_in_its_folder(tmp_path):
    """SIGKILL mid-write leaves the temp file; the folder's next atomic write removes it, and only temp files whose
    writer ran on this host and is gone: not a running writer's, not another host's, not one of unknown writer."""
    host = socket.gethostname()
    child = os.fork()
    if child == 0:  # a writer that stops mid-write, as a step killed while it saves its scores
        try:
            atomic_write(str(tmp_path / "scores.npz"), lambda f: (f.write(b"half"), f.flush(), time.sleep(120)))
        finally:
            os._exit(1)
    killed = f".tmp_scores.npz.{host}-{child}."
    assert wait_for(lambda: any(n.startswith(killed) for n in os.listdir(tmp_path)), 30)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    [left] = os.listdir(tmp_path)
    assert left.startswith(killed)
    scratch = tmp_path / f".tmp_tune.{host}-{child}.ef78"  # a killed step's scratch folder goes too
    (scratch / "model_0").mkdir(parents=True)
    (scratch / "model_0" / "best.pth").write_bytes(b"x")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as running:
        kept = [f".tmp_record.json.{host}-{running.pid}.ab12", f".tmp_b.npz.elsewhere-{child}.cd34", ".tmp_c.npzef56"]
        for name in kept:
            (tmp_path / name).write_bytes(b"x")
        atomic_write(str(tmp_path / "record.json"), lambda f: f.write(b"{}"))
        running.kill()
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "record.json"])
    assert (tmp_path / "record.json").read_bytes() == b"{}"


def killed_mid_call(tmp_path, call):
    """Fork a child that runs call() with os.remove, os.replace and os.rename made to SIGKILL it: a kill at the
    moment a probe or temp file is to be removed or renamed into place. Returns the names left in tmp_path."""
    child = os.fork()
    if child == 0:
        try:
            die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
            os.remove = os.replace = os.rename = die
            call()
        finally:
            os._exit(1)
    os.waitpid(child, 0)
    return child, sorted(os.listdir(tmp_path))


@pytest.mark.parametrize("writer", ["check_writable", "grid_step.write_record"])
def test_a_probe_or_job_record_killed_midway_leaves_a_named_temp_file_that_the_next_write_removes(tmp_path, writer):
    """check_writable's probe and a grid job's record name their temp files .tmp_<name>.<host>-<pid>.XXXX as every
    other write does, so the folder's next write (or probe) removes what a kill left; a job record gets the same
    0644 as every other output file, not mkstemp's 0600."""
    host = socket.gethostname()
    if writer == "check_writable":
        child, left = killed_mid_call(tmp_path, lambda: check_writable(str(tmp_path)))
        name = "probe"
    else:
        child, left = killed_mid_call(tmp_path, lambda: grid_step.write_record(str(tmp_path / "s.json"), {"a": 1}))
        name = "s.json"
    [temp] = left
    assert temp.startswith(f".tmp_{name}.{host}-{child}.")
    check_writable(str(tmp_path))
    assert os.listdir(tmp_path) == []
    old = os.umask(0o022)
    try:
        grid_step.write_record(str(tmp_path / "jobs" / "s.json"), {"a": 1})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "jobs" / "s.json").read_text()) == {"a": 1}
    assert stat.S_IMODE(os.stat(tmp_path / "jobs" / "s.json").st_mode) == 0o644
