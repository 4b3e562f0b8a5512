"""One step of a grid: a command of one of the three scripts run from the repo, its resume record, and
running it (on the local pool, or as the body of a Slurm job).

This module imports nothing of the project but paths.py at its top (no torch): gridrun/slurm.py sends it to each
Slurm job by value, so a job starts in a second. The job puts the repo on its path and imports common.py (which
loads torch only where a function needs it) for the one writer of every output file.
"""

import ctypes
import datetime
import functools
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from paths import LOG_ROOT, RESULT_ROOT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, above gridrun/
GPU = "GPU-ID"  # stands for the GPU-ID in a step's argv until it runs
SCRIPTS = {"pretrain": "pretrain_modi.py", "prune": "prune_modi.py", "attack": "mia_modi.py", "audit": "audit.py"}
FINAL_EXITS = (1, 2)  # the scripts' refusals (usage, missing prerequisite): a retry would be refused again


@dataclass
class Step:
    name: str  # <run>/pretrain, <run>/prune.<prefix>, <run>/attack.<prefix>, <run>/attack.original, <run>/audit.<step>
    kind: str  # pretrain | prune | attack | audit
    argv: list  # after "python"; GPU stands for the GPU-ID
    log: str  # the log file it appends to
    needs: list = field(default_factory=list)  # steps whose outputs it reads
    after: list = field(default_factory=list)  # the step before it in its log file
    memscores: str = None  # the mem-score CSV it reads (prune under a mem-score defense)
    origin: str = ""  # the grid entries it comes from, for error messages

    def command(self, gpu=GPU):
        return shlex.join(["python"] + [gpu if a == GPU else a for a in self.argv])

    @property
    def sha256(self):
        """Of the command with the GPU-ID left as 'GPU-ID': the device is not part of what a step computes."""
        return hashlib.sha256(self.command().encode()).hexdigest()

    @property
    def record(self):
        run, rest = self.name.split("/", 1)
        return os.path.join(RESULT_ROOT, run, "jobs", rest + ".json")

    def output(self, ext):
        return os.path.join(LOG_ROOT, "grid", f"{self.name}.{ext}")


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def last_line_of(path):
    try:
        with open(path, errors="replace") as f:
            return last_line(f.read())
    except OSError:
        return ""


def read_record(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_record(path, record):
    # Imported here, not at the top: a Slurm job unpickles this module before slurm_job puts the repo on its path.
    from common import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def die_with_parent(prctl, parent):
    """In a step's child before exec: SIGTERM once the thread that started it ends (PR_SET_PDEATHSIG = 1),
    so a killed driver leaves no step running. prctl was looked up before the fork: other threads may
    hold the import or loader locks."""
    if prctl is not None:
        prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def run_step(step, gpu, env, retries):
    """Run step's command (1 + retries attempts; exit 1 or 2 is final), output to its .out/.err. On exit 0
    write its record and return (0, record); else (last exit status, None)."""
    for path in (step.output("out"), step.record):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(step.record):  # the outputs are about to change (a rerun, or another grid's setting)
        os.remove(step.record)
    argv = [sys.executable] + [gpu if a == GPU else a for a in step.argv]
    prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
    code = None
    for attempt in range(1 + retries):
        start, mode = time.time(), "w" if attempt == 0 else "a"
        with open(step.output("out"), mode) as out, open(step.output("err"), mode) as err:
            if attempt:
                err.write(f"=== grid.py: attempt {attempt + 1}; the last one ended with {code}\n")
                err.flush()
            code = subprocess.run(
                argv,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, prctl, os.getpid()),
            ).returncode
        if code == 0:
            end = time.time()
            iso = lambda t: datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
            record = {
                "step": step.name,
                "command": step.command(gpu),
                "sha256": step.sha256,
                "exit_status": 0,
                "start": iso(start),
                "end": iso(end),
                "seconds": round(end - start, 3),
                "host": socket.gethostname(),
                "attempt": attempt + 1,
                "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                "slurm_job_id": env.get("SLURM_JOB_ID"),
            }
            write_record(step.record, record)
            return 0, record
        if code in FINAL_EXITS:
            break
    return code, None


def slurm_job(repo, step, gpu, retries):
    """The body of a step's Slurm job. gridrun/slurm.py has cloudpickle send this module by value: the node
    needs the repo only for the command itself."""
    if not os.path.isdir(repo):
        raise RuntimeError(
            f"error: the repo {repo} does not exist on {socket.gethostname()}; grid.py's jobs run "
            f"in it, so it must be on a filesystem shared with the compute nodes"
        )
    os.chdir(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    code, record = run_step(step, gpu, env, retries)
    if code != 0:
        raise RuntimeError(f"{step.name} ended with {code}: {last_line_of(step.output('err'))}")
    return record
