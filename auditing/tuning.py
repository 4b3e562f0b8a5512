"""Choosing a defense's setting in its search space (search_space.py): the Optuna study its trials share, and the
one selection rule.

- **Study.** A trial is one setting, scored on two objectives: mean accuracy on rows that the audit's table
  does not report (maximised) and leakage on the audited rows (minimised). The study lives in a journal file by
  default, or in any storage URL Optuna takes (`sqlite:///tune.db`, a server database), so many processes or
  Slurm jobs can work on one study: worker K of W (Worker) runs its share of the trials with a sampler seeded
  for it (so no two workers draw the same first settings) that treats the others' running trials as taken
  (constant liar). A trial whose process died (a kill, a lost node) is marked failed and its setting queued
  again, so a resumed study never counts a trial twice.
- **Selection.** At a target accuracy, the least-leaking setting of the tuning front whose accuracy is at least
  the target minus the tolerance (choose); the same rule for every defense.
"""

import argparse
import os
from dataclasses import dataclass

import numpy as np

from common import DivergedError, UsageError, pid_alive

DIRECTIONS = ("maximize", "minimize")  # accuracy, leakage
WORKER = "worker"  # a trial's user attribute: <host>-<pid> of the process that runs it
SLOT = "slot"  # a trial's user attribute: K/W, the worker slot that runs it (Worker.slot)


def suggest(trial, space) -> dict:
    """The trial's knob values (Optuna's suggest_float, log-uniform where the knob says so)."""
    return {k.flag: trial.suggest_float(k.flag, k.low, k.high, log=k.log) for k in space}


# ---------------------------------------------------------------- the selection rule


def front(points):
    """The Pareto front of points ({"acc", "leak", ...}: higher accuracy and lower leakage are better): every point
    that no other point is at least as good as on both and better on one, in the order given."""
    return [
        p
        for p in points
        if not any(
            q["acc"] >= p["acc"] and q["leak"] <= p["leak"] and (q["acc"] > p["acc"] or q["leak"] < p["leak"])
            for q in points
        )
    ]


def choose(points, target: float, tolerance: float) -> tuple:
    """(point, within): the least-leaking point of the front whose accuracy is at least target - tolerance; ties
    go to the more accurate, then to the earlier point. When no point reaches it, the most accurate point of the
    front (ties: the less leaking), within False. points: dicts with "acc" and "leak" (finite)."""
    if not points:
        raise ValueError("no trial to choose from")
    candidates = front(points)
    reached = [p for p in candidates if p["acc"] >= target - tolerance]
    if reached:
        return min(reached, key=lambda p: (p["leak"], -p["acc"], points.index(p))), True
    return min(candidates, key=lambda p: (-p["acc"], p["leak"], points.index(p))), False


# ---------------------------------------------------------------- the study


def storage_of(where: str):
    """An Optuna storage: a URL (it holds '://') as Optuna reads it, else a journal file at that path."""
    import optuna

    if "://" in where:
        return optuna.storages.RDBStorage(where)
    os.makedirs(os.path.dirname(os.path.abspath(where)), exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(where))


@dataclass(frozen=True)
class Worker:
    """Worker k (1-based) of w working on one study; the default 1/1 is a process alone. A grid gives every
    worker slot its own step, and never runs one step twice at a time, so a trial left running under this slot
    by another process belongs to a dead one (reclaim)."""

    k: int = 1
    w: int = 1

    @property
    def slot(self) -> str:
        return f"{self.k}/{self.w}"

    def share(self, n_trials: int) -> int:
        """This worker's complete trials of n_trials: n // w, and one more for the first n % w workers."""
        return n_trials // self.w + (self.k <= n_trials % self.w)


def worker_type(text: str) -> Worker:
    """--worker K/W: 1 <= K <= W."""
    k, _, w = text.partition("/")
    if not (k.isdigit() and w.isdigit() and 1 <= int(k) <= int(w)):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/W with 1 <= K <= W, e.g. 2/4 (worker 2 of 4)")
    return Worker(int(k), int(w))


def open_study(name: str, where: str, seed: int, worker: Worker = Worker()):
    """The study `name` in storage `where` (storage_of), created if new, with a seeded multi-objective TPE sampler
    (accuracy up, leakage down); trials this worker slot left running in a dead process are reclaimed (reclaim).
    The sampler's seed is `seed` for a process alone on a new study and (seed, trials so far[, worker]) otherwise:
    the same seed again would draw the same first settings again. Workers of several (w > 1) sample with the
    constant liar, so that two of them do not draw next to each other's running trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_of(where)
    study = optuna.create_study(study_name=name, storage=storage, directions=list(DIRECTIONS), load_if_exists=True)
    so_far = len(study.get_trials(deepcopy=False))
    entropy = [seed, so_far] + ([worker.k, worker.w] if worker.w > 1 else [])
    sampler_seed = seed if not so_far and worker.w == 1 else int(np.random.SeedSequence(entropy).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True, constant_liar=worker.w > 1)
    reclaim(study, storage, worker)
    return study


def worker_mark() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"


def reclaim(study, storage, worker: Worker = Worker()) -> list:
    """Mark failed each trial still running whose process is gone, and queue its setting again once (user
    attribute retry_of: its number; a retry that dies too is not queued again), so a killed trial is neither lost
    nor counted twice. Gone: its process ran on this host and has ended, or it ran under this worker's slot on
    another host (a requeued Slurm job: the slot's step runs once at a time). Returns the numbers reclaimed."""
    from optuna.trial import TrialState

    host = os.uname().nodename
    study_id = storage.get_study_id_from_name(study.study_name)
    reclaimed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(WORKER, ""))
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host:
            gone = pid.isdigit() and not pid_alive(int(pid))
        else:
            gone = trial.user_attrs.get(SLOT) == worker.slot and worker.w > 1
        if not gone:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if "retry_of" not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        reclaimed.append(trial.number)
    return reclaimed


def completed(study, slot: str = None) -> list:
    """The study's complete trials (of one worker slot's, given one)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in done if slot is None or t.user_attrs.get(SLOT) == slot]


def run_trials(study, n_trials: int, space, evaluate, worker: Worker = Worker()) -> int:
    """Ask and run trials until the study holds n_trials complete ones (counting every worker's), or, for worker
    k of w > 1, until it holds this worker's share of them (Worker.share); evaluate(values) returns (accuracy,
    leakage). A setting the defense refuses (evaluate raises UsageError, e.g. a window that passes every class)
    or that training cannot finish (DivergedError: a non-finite loss) is a failed trial with the reason as its
    user attribute `refused`, and does not count; after 2 * n_trials refusals in this process the search stops
    with a UsageError. Returns the trials run here."""
    from optuna.trial import TrialState

    if worker.w > 1:
        todo = lambda: worker.share(n_trials) - len(completed(study, worker.slot))
    else:
        todo = lambda: n_trials - len(completed(study))
    ran, refused = 0, 0
    while todo() > 0:
        trial = study.ask()
        trial.set_user_attr(WORKER, worker_mark())
        trial.set_user_attr(SLOT, worker.slot)
        values = suggest(trial, space)
        try:
            objectives = evaluate(values)
        except (UsageError, DivergedError) as err:
            trial.set_user_attr("refused", str(err))
            study.tell(trial, state=TrialState.FAIL)
            refused += 1
            if refused >= 2 * n_trials:
                raise UsageError(f"{refused} settings of the search space were refused, the last: {err}")
            continue
        study.tell(trial, list(objectives))
        ran += 1
    return ran
