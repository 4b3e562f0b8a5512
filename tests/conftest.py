"""Shared test helpers: the repo on sys.path, and running a script as a subprocess in a folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import paths  # noqa: E402

# Tests use small tensors; on a shared, busy CPU, multi-threaded kernels spend most of their time
# waiting for each other (a 2-epoch attack: 9 s with 2 threads vs 0.5 s with 1).
torch.set_num_threads(1)

# The files whose tests take longest (the GPU check's CPU dry run alone is about 5 minutes), longest first.
LONGEST_FIRST = ("tests/test_gpu_check.py", "tests/test_grid.py")


def pytest_collection_modifyitems(items):
    """Collect the longest files first. The two workers take whole files in collection order
    (--dist loadfile --no-loadscope-reorder), so these run beside the others instead of alone at the end;
    every worker sorts alike, as pytest-xdist requires."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def run_script(script, *args, cwd, check=True, timeout=600, repo=REPO):
    """Run `python <repo>/script args...` with cwd as working directory (so result/ and log/ land
    there) on the CPU with one thread (see above). data/datasets/ and memscore/ are the repo's
    (paths.py): pass repo=copy_repo(...) for a run with data and mem-scores of its own. Returns the
    CompletedProcess; with check, a non-zero exit fails the test with the script's output."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    if os.path.abspath(repo) != REPO:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a copy's files stay as copied (tests compare snapshots)
    cmd = [sys.executable, os.path.join(repo, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-3000:]}"
        )
    return proc


def copy_repo(target, memscores=True):
    """A runnable copy of the repo in target (which may exist): the files git knows (tracked, or new and not
    ignored) and the shipped digits mem-scores, without memscore/ unless memscores; no data, results or
    logs. Scripts run from it (run_script(..., repo=target)) read and write data/datasets/ and memscore/
    under target, since paths.py resolves those from the scripts' own folder. Returns target as a str."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    names = set(filter(None, listed)) | {"memscore/memscore_digits_columnfc.csv"}
    left_out = ("result/", "log/") + (() if memscores else ("memscore/",))
    for name in sorted(names):
        if not name.startswith(left_out) and os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(target, name))
    return str(target)


def as_repo(monkeypatch, folder):
    """For an in-process test: folder becomes the working directory and the home of data/datasets/ and
    memscore/ (which paths.py otherwise resolves from the repo), under their short relative names as
    the scripts' messages would give them with the repo as working directory. The test then reads and
    writes under folder only, never the repo's shipped mem-scores or data."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(paths, "DATA_ROOT", os.path.join("data", "datasets"))
    monkeypatch.setattr(paths, "MEMSCORE_ROOT", "memscore")


def write_run_record(folder, kind, run_id, results, log=None, scores=None, **run):
    """A run record of digits_columnfc as records.py writes it, under folder/result/<run_name>/records/ (its
    path is returned); `run` overrides the Base run fields, `log` names its log block ({path, offset, end})
    or None."""
    run = {
        "run_name": "digits_columnfc",
        "dataset": "digits",
        "model": "columnfc",
        "pruner": "iter_prunetxt",
        "sparsity": 0.6,
        "defense": "base",
        "defend_arg": None,
        "window": None,
        "weight_decay_mem": 0.0005,
        "semantics": "release",
        "tag": "",
        "seed": 7,
        "prefix": "iter_prunetxt_0.6",
        **run,
    }
    record = {
        "format": 1,
        "kind": kind,
        "run_id": run_id,
        "start": f"2025-01-01T00:00:{run_id}.000000Z",
        "end": f"2025-01-01T00:00:{run_id}.500000Z",
        "code": {"commit": None, "dirty": None},
        "run": run,
        "settings": {},
        "log": log,
        "results": results,
        **({"scores": scores} if scores else {}),
    }
    path = os.path.join(str(folder), "result", run["run_name"], "records", f"{kind}_{run_id}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f)
    return path
