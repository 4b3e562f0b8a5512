"""grid.py for real: subprocesses in temporary copies of the repo, the local Slurm, no mocks.

A tiny grid derived from grids/digits.json (2 pretraining epochs, 2 pruning iterations of 2 epochs, one
shadow, the threshold attacks) runs three ways, started together so that they share the 2 cores: by
grid.py's local backend (--jobs 2), by its own --dry_run script run with bash (the reference: the same
commands one by one) and by the Slurm backend on slurm/local_cluster.sh's cluster. A second grid (two
slide_re windows and an ml2 setting prune_modi.py refuses) then runs in the local copy, killed once and
resumed. Slurm: a running cluster when SLURM_CONF is set and answers, else one started for this module;
without one the Slurm test fails, or is skipped loudly when WEMEM_ALLOW_NO_SLURM=1.
"""

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO, copy_repo
from reporting import results

sys.path.insert(0, os.path.join(REPO, "bench"))
from bench_grid import log_numbers  # noqa: E402  (the benchmark's own check that two runs logged the same numbers)

pytestmark = pytest.mark.slow  # runs the scripts end to end

RUN = "digits_columnfc"
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
TINY = {
    "prune_iter": 2,
    "shadow_num": 1,
    "attacks": "threshold",
    "original": False,
    "control": False,
    "overrides": {
        "pretrain": {"epochs": 2, "no_tensorboard": True},
        "prune": {"prune_epochs": 2, "no_tensorboard": True},
    },
}
EXTRA = {"defenses": [{"defend": "slide_re", "stride": [1, 2], "width": 15}, {"defend": "ml2", "mem_thre": 5.0}]}
STEPS = ["pretrain"] + [
    f"{kind}.iter_prunetxt_0.6{suffix}"
    for suffix in ("", "_slide_re", "_ml2", "_slide_ml2")
    for kind in ("prune", "attack")
]
CLUSTER_SCRIPT = os.path.join(REPO, "slurm", "local_cluster.sh")


def write_grid(folder, name, **changes):
    with open(os.path.join(REPO, "grids", "digits.json")) as f:
        grid = {**json.load(f), **TINY, **changes}
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(grid, f)
    return path


class Run:
    """A command started in the background, output in files; result() waits for it."""

    def __init__(self, cmd, cwd, env=ENV):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout=600):
        code = self.proc.wait(timeout)
        self.out.seek(0), self.err.seek(0)
        return code, self.out.read(), self.err.read()


def grid(copy, *args, env=ENV):
    return Run([sys.executable, os.path.join(copy, "grid.py"), *args], copy, env)


def records(copy):
    folder = os.path.join(copy, "result", RUN, "jobs")
    return {
        name[:-5]: json.load(open(os.path.join(folder, name))) for name in os.listdir(folder) if name.endswith(".json")
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(state_dir):
    """(environment for Slurm commands, stop function or None), or (None, why there is no cluster)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)  # sbatch passes the environment on; Slurm sets it for --gres jobs
    env.pop("OMP_NUM_THREADS", None)  # GNU nproc answers OMP_NUM_THREADS: the node would get 1 CPU
    answers = lambda e: all(
        subprocess.run(cmd, env=e, capture_output=True, timeout=30).returncode == 0
        for cmd in (["scontrol", "ping"], ["sinfo", "-h"])
    )
    if os.environ.get("SLURM_CONF") and shutil.which("sinfo") and answers(env):
        return {**env, "OMP_NUM_THREADS": "1"}, None
    if os.geteuid() != 0:
        return None, "not root (the local cluster's daemons run as root)"
    ports = dict(WEMEM_SLURMCTLD_PORT=str(free_port()), WEMEM_SLURMD_PORT=str(free_port()))
    start = subprocess.run(
        ["bash", CLUSTER_SCRIPT, "start", state_dir], env={**env, **ports}, capture_output=True, text=True, timeout=600
    )
    stop = lambda: subprocess.run(["bash", CLUSTER_SCRIPT, "stop", state_dir], capture_output=True, timeout=120)
    if start.returncode != 0:
        stop()
        return None, f"`local_cluster.sh start` failed: {start.stderr[-2000:]}"
    return {**env, "SLURM_CONF": start.stdout.strip().split("=", 1)[1], "OMP_NUM_THREADS": "1"}, stop


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny grid's three runs, started at once: local (--jobs 2), the --dry_run script, Slurm."""
    base = tmp_path_factory.mktemp("grid")
    copies = {name: copy_repo(base / name) for name in ("local", "reference", "slurm")}
    tiny = write_grid(str(base), "tiny.json")
    code, script, err = grid(copies["reference"], tiny, "--dry_run").result()
    assert code == 0, err
    script_path = base / "tiny.sh"
    script_path.write_text(script)
    started = {
        "local": grid(copies["local"], tiny, "--jobs", "2"),
        "reference": Run(["bash", str(script_path)], copies["reference"]),
    }
    state_dir = tempfile.mkdtemp(prefix="wemem-grid-slurm-", dir="/tmp")  # short: the munge socket's path
    slurm_env, stop = start_cluster(state_dir)
    if slurm_env:
        started["slurm"] = grid(copies["slurm"], tiny, "--backend", "slurm", "--no_summary", env=slurm_env)
    else:
        started["slurm"] = stop  # why there is no cluster
    yield Runs(base, copies, script, started)
    for run in started.values():
        if isinstance(run, Run) and run.proc.poll() is None:
            run.proc.kill()
    if slurm_env and stop:
        stop()
    shutil.rmtree(state_dir, ignore_errors=True)


class Runs:
    """The copies of the repo, the dry-run script and the started runs (a Run, or why Slurm is missing)."""

    def __init__(self, base, copies, script, started):
        self.base, self.copies, self.script, self.started, self.results = base, copies, script, started, {}

    def result(self, name):
        if name not in self.results:
            self.results[name] = self.started[name].result()
        return self.results[name]


def one_error_line(proc_result):
    code, out, err = proc_result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    return lines[0]


def tree(folder):
    """Every file under folder but Python's byte-code caches."""
    return sorted(
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, files in os.walk(folder)
        for f in files
        if "__pycache__" not in d
    )


def test_bad_grids_are_one_error_line_and_write_nothing(runs, tmp_path):
    """(`runs` first: the long runs go on in the background meanwhile.)"""
    copy = copy_repo(tmp_path / "repo")
    before = tree(copy)
    cases = {
        "unknown key 'epochs'": {"epochs": 2},
        "unknown defense 'nosuch'": {"defenses": [{"defend": "nosuch"}]},
        "unknown attack 'nosuch'": {"attacks": "threshold,nosuch"},
        "defenses[1] (slide_re): needs stride": {"defenses": [{"defend": "base"}, {"defend": "slide_re", "width": 15}]},
        "sparsities": {"sparsities": "0.6"},
        "--nosuch": {"overrides": {"prune": {"nosuch": 1}}},
    }
    started = {
        text: grid(copy, write_grid(str(tmp_path), f"bad{i}.json", **change))
        for i, (text, change) in enumerate(cases.items())
    }
    dry = grid(copy, write_grid(str(tmp_path), "good.json"), "--dry_run")
    for text, run in started.items():
        assert text in one_error_line(run.result())
    assert dry.result()[0] == 0
    assert tree(copy) == before


def test_dry_run_is_a_bash_script_in_dependency_order(runs):
    subprocess.run(["bash", "-n", "-c", runs.script], check=True)
    lines = runs.script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert "9 steps (pretrain 1, prune 4, attack 4)" in lines[1]
    names = [line[2:] for line in lines if line.startswith(f"# {RUN}/")]
    commands = [line for line in lines if line.startswith("python ")]
    assert [name.split("/")[1] for name in names] == STEPS and len(commands) == 9  # each attack after its prune
    scripts = {"pretrain": "pretrain_modi.py", "prune": "prune_modi.py", "attack": "mia_modi.py"}
    for name, command in zip(names, commands):
        script = scripts[name.split("/")[1].split(".")[0]]
        assert command.startswith(f"python {script} -1 config/digits.json ") and command.endswith(" --quiet")
    assert "--epochs 2" in commands[0] and "--prune_epochs 2" in commands[1]


def test_local_backend_matches_the_commands_run_one_by_one(runs):
    code, out, err = runs.result("local")
    assert code == 0, err
    assert runs.result("reference")[0] == 0, runs.result("reference")[2]
    copy = runs.copies["local"]
    assert set(records(copy)) == set(STEPS)
    for _name, record in records(copy).items():
        assert record["exit_status"] == 0 and record["cuda_visible_devices"] == "" and " -1 " in record["command"]
    numbers = log_numbers(copy)
    assert numbers == log_numbers(runs.copies["reference"])
    for name in ("base", "slide_re", "ml2", "slide_ml2"):
        lines = "\n".join(numbers[f"iter_prunetxt_0.6_{name}.txt"])
        for pattern in (
            r"Pretrained Victim: Accuracy \d",
            r"victim iter 1 best model",
            r"shadow 0 iter 1 best model",
            r"Victim pruned model test accuracy: \d",
            r"Hconf attack TPR@0\.1%FPR: \d",
        ):
            assert re.search(pattern, lines), (name, pattern)
        prefix = "iter_prunetxt_0.6" + ("" if name == "base" else f"_{name}")
        for folder in (f"{prefix}_model", f"shadow_{prefix}_model_0"):
            for file in ("best.pth", "best_mask.pth"):
                assert os.path.isfile(os.path.join(copy, "result", RUN, folder, file))
    assert "9 steps to run: 9 done, 0 failed, 0 skipped" in err
    for path in ("results.csv", "tradeoff.png", "log/grid/results.md"):
        assert os.path.getsize(os.path.join(copy, path)) > 0, path


@pytest.fixture(scope="module")
def resumed(runs):
    """The second grid in the local copy: killed (SIGKILL, by pid) after its first record, then rerun."""
    assert runs.result("local")[0] == 0
    copy, extra = runs.copies["local"], write_grid(str(runs.base), "extra.json", **EXTRA)
    before = records(copy)
    driver = grid(copy, extra, "--jobs", "2", "--no_summary")
    deadline = time.time() + 300
    while not set(records(copy)) - set(before) and driver.proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert driver.proc.poll() is None, "the driver ended before it could be killed"
    os.kill(driver.proc.pid, signal.SIGKILL)
    driver.result()
    kept = {
        name: (open(os.path.join(copy, "result", RUN, "jobs", name + ".json"), "rb").read(), record)
        for name, record in records(copy).items()
        if name not in before
    }
    mtimes = {
        path: os.stat(path).st_mtime_ns
        for name in kept
        if name.startswith("prune.")
        for path in [os.path.join(copy, "result", RUN, name[6:] + "_model", "best.pth")]
    }
    orphans = lambda: [pid for pid in os.listdir("/proc") if pid.isdigit() and step_of(pid, copy)]
    deadline = time.time() + 20
    while orphans() and time.time() < deadline:
        time.sleep(0.2)
    left = orphans()
    rerun = grid(copy, extra, "--jobs", "2").result()
    return copy, kept, mtimes, left, rerun


def step_of(pid, copy):
    """Whether process pid is a step (a *_modi.py script) running in copy."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == copy and b"_modi.py" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


def test_killed_driver_resumes_without_redoing_finished_steps(resumed):
    copy, kept, mtimes, left, (code, out, err) = resumed
    assert not left, "steps outlived the killed driver"
    assert kept, "no step had finished when the driver was killed"
    for name, (raw, _record) in kept.items():
        with open(os.path.join(copy, "result", RUN, "jobs", name + ".json"), "rb") as f:
            assert f.read() == raw, f"{name}'s record was rewritten"
    for path, mtime in mtimes.items():
        assert os.stat(path).st_mtime_ns == mtime, f"{path} was rewritten"
    assert "done before were not rerun" in err
    done = set(records(copy))
    for tag in ("s1", "s2"):
        assert {f"prune.iter_prunetxt_0.6_slide_re_tag-{tag}", f"attack.iter_prunetxt_0.6_slide_re_tag-{tag}"} <= done


def test_failed_step_skips_its_dependents_and_the_rest_completes(resumed):
    copy, _, _, _, (code, out, err) = resumed
    assert code == 1, err
    failed = re.search(r"failed: digits_columnfc/prune\.iter_prunetxt_0\.6_ml2: exit 2: (.*)", err)
    assert failed and "--mem_thre 5.0 is outside the mem-scores' range" in failed.group(1), err
    assert re.search(r"skipped, as a step they need failed: digits_columnfc/attack\.iter_prunetxt_0\.6_ml2", err)
    assert "prune.iter_prunetxt_0.6_ml2" not in records(copy)


def test_two_settings_of_one_defense_get_tagged_names(resumed):
    copy = resumed[0]
    for tag in ("s1", "s2"):
        for folder in (
            f"iter_prunetxt_0.6_slide_re_tag-{tag}_model",
            f"shadow_iter_prunetxt_0.6_slide_re_tag-{tag}_model_0",
        ):
            assert os.path.isfile(os.path.join(copy, "result", RUN, folder, "best.pth"))
        assert os.path.isfile(os.path.join(copy, "log", RUN, f"iter_prunetxt_0.6_slide_re_tag-{tag}.txt"))
    df = results.parse_logs(os.path.join(copy, "log"))
    tag_of = lambda row: (
        row.get("tag") if isinstance(row.get("tag"), str) and row.get("tag") else row["defense"].partition("_tag-")[2]
    )
    attacked = [tag_of(row) for _, row in df.iterrows() if row["setting"] == "adaptive"]  # a killed prune
    assert sorted(t for t in attacked if t) == ["s1", "s2"]  # leaves a row without attack: not counted


def test_slurm_backend_matches_and_chains_its_jobs(runs):
    if not isinstance(runs.started["slurm"], Run):
        message = runs.started["slurm"]
        if os.environ.get("WEMEM_ALLOW_NO_SLURM") == "1":
            pytest.skip(f"!!! NO SLURM: the Slurm backend was NOT TESTED (WEMEM_ALLOW_NO_SLURM=1): {message}")
        pytest.fail(f"cannot run Slurm here: {message} (WEMEM_ALLOW_NO_SLURM=1 skips this test)")
    code, out, err = runs.result("slurm")
    assert code == 0, err
    copy = runs.copies["slurm"]
    assert runs.result("reference")[0] == 0
    assert log_numbers(copy) == log_numbers(runs.copies["reference"])
    jobs = records(copy)
    assert set(jobs) == set(STEPS)
    for name, record in jobs.items():  # afterok on the job of the step it needs, as submitted
        job = record["slurm_job_id"]
        with open(os.path.join(copy, "log", "grid_slurm", job, f"{job}_submission.sh")) as f:
            submitted = f.read()
        needs = {"prune": "pretrain", "attack": "prune" + name[6:]}.get(name.split(".")[0])
        if needs:
            assert f"#SBATCH --dependency=afterok:{jobs[needs]['slurm_job_id']}\n" in submitted, submitted
            assert "#SBATCH --kill-on-invalid-dep=yes" in submitted
        assert "#SBATCH --gres=gpu:1" in submitted and " 0 config/digits.json" in record["command"]
    when = lambda r: (datetime.datetime.fromisoformat(r["start"]), datetime.datetime.fromisoformat(r["end"]))
    together = [
        (a, b)
        for a in jobs.values()
        for b in jobs.values()
        if a["step"] < b["step"] and when(a)[0] < when(b)[1] and when(b)[0] < when(a)[1]
    ]
    assert together, "no two steps ran at the same time"
    for a, b in together:
        assert {a["cuda_visible_devices"], b["cuda_visible_devices"]} == {"0", "1"}, (a, b)
