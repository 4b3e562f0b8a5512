"""The Slurm backend: one submitit job per step, chained by dependencies, and the driver that polls them."""

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections import Counter

from common import MissingError, UsageError
from gridrun import step as grid_step
from gridrun.step import REPO, last_line, last_line_of, read_record, slurm_job
from gridrun.tracker import Tracker
from paths import LOG_ROOT

ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}  # squeue states of a job that has not ended
POLL_S = 3.0


def squeue(*args):
    proc = subprocess.run(
        ["squeue", "-h", "-u", pwd.getpwuid(os.getuid()).pw_name, *args], capture_output=True, text=True
    )
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def require_slurm(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            raise MissingError(f"{tool} not found: install Slurm or use --backend local")


def slurm_gpus(partition):
    """1 when the partition (or any, without --partition) has GPU gres, else 0."""
    require_slurm("sinfo")
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%G", *(["-p", partition] if partition else [])], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise MissingError(
            f"Slurm does not answer (sinfo: {proc.stderr.strip() or proc.returncode}); start it or "
            f"set SLURM_CONF, or use --backend local"
        )
    return int("gpu" in proc.stdout)


def submit_slurm(todo, opts, gpus):
    """One job per step, in grid order, depending on the jobs of the steps it needs (afterok) and of the
    step before it in its log (afterany). Jobs of this grid still queued from an earlier driver are adopted."""
    import cloudpickle
    import submitit

    cloudpickle.register_pickle_by_value(grid_step)  # the job body and its Step: see gridrun/step.py

    extra = dict(item.split("=", 1) for item in opts.slurm_extra.split(",") if item) if opts.slurm_extra else {}
    queued = {line.split("|", 1)[1]: line.split("|", 1)[0] for line in squeue("-o", "%i|%k") or []}
    executor = submitit.SlurmExecutor(folder=os.path.join(LOG_ROOT, "grid_slurm", "%j"), max_num_timeout=0)
    ids, adopted = {}, 0
    for step in todo:
        key = "wemem-grid-" + hashlib.sha256(f"{REPO} {step.sha256}".encode()).hexdigest()[:16]
        if key in queued:
            ids[step.name], adopted = queued[key], adopted + 1
            continue
        if os.path.exists(step.record):  # stale (a step it needs reruns, or --force): not a sign of success
            os.remove(step.record)
        ok = [ids[name] for name in step.needs if name in ids]
        any_ = [ids[name] for name in step.after if name in ids]
        dependency = ",".join(
            f"{kind}:{':'.join(jobs)}" for kind, jobs in (("afterok", ok), ("afterany", any_)) if jobs
        )
        executor.update_parameters(
            job_name=step.name,
            partition=opts.partition,
            time=opts.time,
            cpus_per_task=opts.cpus_per_job,
            gres=f"gpu:{gpus}" if gpus else None,
            mem=f"{opts.mem_gb}GB" if opts.mem_gb else None,
            comment=key,
            additional_parameters={
                **extra,
                **({"dependency": dependency, "kill_on_invalid_dep": "yes"} if dependency else {}),
            },
        )
        try:
            ids[step.name] = executor.submit(slurm_job, REPO, step, "0" if gpus else "-1", opts.retries).job_id
        except Exception as err:  # sbatch refused: a bad --partition, --time or --slurm_extra
            mine = [job for name, job in ids.items() if job not in queued.values()]
            if mine:
                subprocess.run(["scancel", *mine], capture_output=True)
            raise UsageError(
                f"sbatch refused {step.name} ({last_line(str(err))}); the {len(mine)} jobs "
                f"submitted before it were cancelled; check --partition, --time, --slurm_extra"
            )
    print(
        f"submitted {len(todo) - adopted} Slurm jobs"
        + (f", adopted {adopted} still queued" if adopted else "")
        + f"; their files are in {LOG_ROOT}/grid_slurm/<job id>/",
        file=sys.stderr,
    )
    return ids


def wait_slurm(todo, done, ids):
    """Poll the records and squeue until every job has ended; a job that left the queue without a record
    (looked at twice, for a shared filesystem's delay) failed, or was cancelled as its dependency failed."""
    state, tracker = dict.fromkeys(done, "done"), Tracker(todo)
    waiting, gone, no_answer = list(todo), Counter(), 0
    while waiting:
        lines = squeue("-o", "%i %T")
        if lines is None:
            no_answer += 1
            if no_answer > 20:
                raise MissingError("squeue fails; the jobs go on: rerun the same grid.py command to wait for them")
            time.sleep(POLL_S)
            continue
        active = {job: job_state for job, job_state in (line.split()[:2] for line in lines)}
        ours = Counter(active.get(ids[step.name]) for step in waiting)
        running, pending = ours["RUNNING"], ours["PENDING"]
        for step in list(waiting):
            job = ids[step.name]
            record = read_record(step.record) or {}
            if record.get("sha256") == step.sha256:
                how, why = "done", ""
            elif active.get(job) in ACTIVE:
                if active[job] == "PENDING" and any(state.get(n) in ("failed", "skipped") for n in step.needs):
                    subprocess.run(["scancel", job], capture_output=True)  # if kill-on-invalid-dep did not
                continue
            else:
                gone[step.name] += 1
                if gone[step.name] < 2:
                    continue
                if any(state.get(need) in ("failed", "skipped") for need in step.needs):
                    how, why = "skipped", ""
                else:
                    submitit_err = os.path.join(LOG_ROOT, "grid_slurm", job, f"{job}_0_log.err")
                    why = f"Slurm job {job}: " + (
                        last_line_of(step.output("err"))
                        or last_line_of(submitit_err)
                        or "left the queue without a result (cancelled, timed out?)"
                    )
                    how = "failed"
            state[step.name] = how
            waiting.remove(step)
            tracker.finish(step, how, why, seconds=record.get("seconds"), running=running, pending=pending)
        tracker.show(running)
        if waiting:
            time.sleep(POLL_S)
    tracker.close()
    return tracker
