"""Helpers that several test files share: the digits scripts' command lines, a script's main() run in this
process, a script started in the background (to signal it), a copy of a finished run, the one row of a
results table that matches, and the small models and recipes more than one file builds. Fixtures stay in
conftest.py; these are plain functions."""

import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO

DIGITS = os.path.join(REPO, "config", "digits.json")


def pretrain_cmd(epochs, shadows, *more, config=DIGITS):
    """pretrain_modi.py's command line (for run_script) on the CPU with the digits config, no TensorBoard."""
    flags = ["--epochs", str(epochs), "--shadow_num", str(shadows), "--no_tensorboard"]
    return ["pretrain_modi.py", "-1", config, *flags, *more]


def prune_cmd(epochs, shadows, *more, iterations=2, config=DIGITS):
    """prune_modi.py's command line: Base pruning (unless `more` names a defense) of the digits run with
    iter_prunetxt to the default sparsity 0.6 in `iterations` iterations of `epochs` epochs (TensorBoard on
    unless `more` turns it off)."""
    pruning = ["--pruner_name", "iter_prunetxt", "--prune_iter", str(iterations), "--prune_epochs", str(epochs)]
    return ["prune_modi.py", "-1", config, *pruning, "--shadow_num", str(shadows), *more]


def attack_cmd(shadows, *more, config=DIGITS):
    """mia_modi.py's command line: the threshold attacks on the Base-pruned digits run."""
    attack = ["--pruner_name", "iter_prunetxt", "--attacks", "threshold", "--shadow_num", str(shadows)]
    return ["mia_modi.py", "-1", config, *attack, *more]


# Each script's __main__ in turn inside ONE Python process: importing torch, scikit-learn and torch's
# compiler (its optimizers load it) costs about 4 s of CPU per process, a tiny digits run about one.
ONE_PROCESS = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as end:
        if end.code:
            raise
"""


def run_scripts(*commands, cwd, repo=REPO, timeout=900):
    """Run each command (script, args...: what run_script takes) in turn as `python <repo>/script args` would,
    but all inside one Python process, on the CPU with one thread: the same files and numbers without paying
    the start-up per script. For runs that a test then reads; a test about a script's exit status, output or
    signals runs it alone (run_script). A non-zero exit fails the test with the output."""
    runs = [[os.path.join(repo, command[0]), *map(str, command[1:])] for command in commands]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1", PYTHONPATH=repo)
    if os.path.abspath(repo) != REPO:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a copy's files stay as copied, as with run_script
    proc = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, json.dumps(runs)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{runs} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
    return proc


class ScriptServer:
    """tests/script_server.py, started once: run() is run_script(..., check=False) without the start-up."""

    def __init__(self):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        server = os.path.join(REPO, "tests", "script_server.py")
        self.proc = subprocess.Popen(
            [sys.executable, server], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.streams, self.jobs = tempfile.mkdtemp(prefix="wemem-streams-"), 0

    def run(self, script, *args, cwd, repo=REPO, text=True):
        """`python <repo>/script args` in cwd as a forked child of the server: a CompletedProcess with its exit
        status, stdout and stderr (str, or bytes when not text)."""
        self.jobs += 1
        out, err = (os.path.join(self.streams, f"{self.jobs}.{name}") for name in ("out", "err"))
        job = {"script": os.path.join(repo, script), "args": [str(a) for a in args], "cwd": str(cwd), "repo": str(repo)}
        self.proc.stdin.write(json.dumps({**job, "stdout": out, "stderr": err}) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self.proc.stdout.readline())
        read = (lambda path: open(path).read()) if text else (lambda path: open(path, "rb").read())
        return subprocess.CompletedProcess([script, *job["args"]], status, read(out), read(err))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.streams, ignore_errors=True)


_server = []  # this process's ScriptServer, started by the first run_forked


def run_forked(script, *args, cwd, repo=REPO, text=True):
    """run_script(script, *args, cwd=cwd, repo=repo, check=False) through one ScriptServer per test process
    (closed at exit): the same exit status, output and files, without seconds of imports per run. For runs
    whose exit status, output and files a test checks; signals and timing stay with real processes."""
    if not _server:
        _server.append(ScriptServer())
        atexit.register(_server[0].close)
    return _server[0].run(script, *args, cwd=cwd, repo=repo, text=text)


def start_script(script, *args, cwd, stdout=subprocess.PIPE):
    """Start `python <repo>/script args` as run_script runs it (CPU, one thread) and return the Popen without
    waiting: stderr piped, text. Ctrl-C (SIGINT) acts as in a terminal: a shell's background job would
    ignore it."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(done, timeout, proc=None):
    """Poll done() every 50 ms until it holds, `timeout` seconds pass or proc (if given) ends; done()'s last value."""
    deadline = time.time() + timeout
    while not done() and time.time() < deadline and (proc is None or proc.poll() is None):
        time.sleep(0.05)
    return done()


def run_main(script, args, cwd, monkeypatch):
    """script.main() in-process with the command line `args`, working directory cwd (a subprocess costs
    seconds of imports)."""
    module = __import__(script)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
    module.main()


@contextmanager
def one_thread():
    """torch on one thread inside (tiny models: on a busy machine more threads only spin), as before after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def copy_run(finished, tmp_path):
    """tmp_path holding a copy of the folder of a finished run (a module fixture's), to change freely."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path


def one_row(df, **where):
    """The one row of a results table whose columns equal `where` (None: the column is empty); fails unless exactly
    one matches."""
    hit = df
    for col, value in where.items():
        hit = hit[hit[col].isna()] if value is None else hit[hit[col] == value]
    assert len(hit) == 1, f"{len(hit)} rows match {where}"
    return hit.iloc[0]


def is_nan(value):
    """An empty cell of a results table."""
    return isinstance(value, float) and math.isnan(value)


def bn_model():
    """A small conv net with BatchNorm2d, like the image models (8x8 digit-sized inputs): its microbatch
    gradients take dp's loop path, not vmap."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def memscore_recipe(**overrides):
    """compute_memscore.py's arguments for a small digits estimate (ColumnFC, 12 models of 40 epochs)."""
    args = SimpleNamespace(
        model_name="columnfc",
        num_cls=10,
        input_dim=64,
        optimizer="adam",
        lr=0.005,
        weight_decay=0.0,
        epochs=40,
        batch_size=32,
        num_models=12,
        subset_ratio=0.5,
        seed=3,
    )
    vars(args).update(overrides)
    return args
