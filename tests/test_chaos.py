"""Chaos: a tiny digits grid run by grid.py --jobs 2 while SIGKILLs, at seeded random moments, hit its running
steps and the driver itself; the driver is rerun until it exits 0. The end must be the end of the same grid run
once without a fault, which runs beside it: the same numbers in results.csv, the same checkpoints byte for byte,
no staging folder or temp file left behind, one full row per configuration. Real subprocesses, no mocks.

A killed step is retried by the driver (--retries 1); a step killed twice fails, so the driver exits 1 and is
rerun. A killed driver takes its running steps with it (they get SIGTERM: grid.die_with_parent) and is rerun at
once, while they may still be ending; one killed just as a step ended, before it wrote the step's record, makes
the rerun run that finished step again.
"""

import hashlib
import os
import random
import signal
import time
from collections import Counter

import pandas as pd
import pytest

from conftest import copy_repo
from reporting.results import KEY
from test_grid import RUN, grid, step_of, write_grid

pytestmark = pytest.mark.slow  # runs the grid end to end, twice

SEED = 26
# In an order the seed draws. "ended": the driver is killed just after one of its steps ended, before it could
# write the step's record (it is stopped, SIGSTOP, until a step has ended): that step, finished, runs again.
KILLS = ["step"] * 6 + ["driver"] * 2 + ["ended"] * 2
STEPS = 5  # of the grid: pretrain, two prunes, their attacks
DELAY_S = (0.0, 3.0)  # a kill comes this long (uniformly) after its number of steps have finished
RERUNS = 8  # drivers started beyond one per kill before the test gives up
GRID = {
    "prune_iter": 2,
    "shadow_num": 2,
    "attacks": "threshold,lira,rmia",
    "defenses": [{"defend": "base"}, {"defend": "slide_re", "stride": 1, "width": 5}],
    "overrides": {
        "pretrain": {"epochs": 2, "no_tensorboard": True},
        "prune": {"prune_epochs": 2, "no_tensorboard": True},
        "attack": {"no_tensorboard": True, "bootstrap": 0},
    },
}
# What the scripts write for a moment only: common.atomic_write's temp files (.tmp_<name>.<host>-<pid>.XXXX, beside
# the file they become, the grid's job records' too; a killed step's are cleared by the next write in their folder)
# and train.Staging's model folders (<folder>.partial-<host>-<pid>).
TRANSIENT = (".tmp_", ".partial-")
# Files of result/ that differ between two runs by design: when a model finished (complete.json), a step's
# times (jobs/), the run records and scores named by their run's start time and pid.
TIMED = ("complete.json", "jobs", "records", "scores")


def steps_of(driver):
    """The pids of the steps (*_modi.py) the driver process runs now, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if parent == driver and b"_modi.py" in f.read():
                    pids.append(int(name))
        except (OSError, ValueError, IndexError):
            continue  # not a process, or one that has just ended
    return sorted(pids)


def kill_a_step(driver, rng):
    """SIGKILL one step the driver runs (the first to run, when none does); the step's script and defense, or None
    if the driver ended first."""
    while driver.proc.poll() is None:
        pids = steps_of(driver.proc.pid)
        if pids:
            pid = rng.choice(pids)
            what = step_shown(pid)
            try:
                os.kill(pid, signal.SIGKILL)
                return what
            except ProcessLookupError:
                pass  # it ended meanwhile: pick again
        time.sleep(0.02)
    return None


def kill_the_driver_as_a_step_ends(driver):
    """Stop the driver (SIGSTOP), wait until one of its running steps has ended (a zombie: the driver cannot reap
    it), SIGKILL the driver; what it killed. Without a step running, it is killed at once."""
    pid = driver.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        running = {step: step_shown(step) for step in steps_of(pid)}
        deadline = time.monotonic() + 300
        while running and not (ended := [step for step in running if state(step) in ("Z", "?")]):
            assert time.monotonic() < deadline, f"no step of {running} ended in 300 s"
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
    if not running:
        return "driver with 0 steps running"
    return f"driver with {len(running)} steps running, as {running[ended[0]]} ended"


def state(pid):
    """The process's state letter (R, S, Z...), ? once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def step_shown(pid):
    """e.g. `prune_modi.py --defend slide_re`, from the step's command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0")]
    except OSError:
        return "a step"
    script = next((os.path.basename(a) for a in argv if a.endswith("_modi.py")), "a step")
    return script + (f" --defend {argv[argv.index('--defend') + 1]}" if "--defend" in argv else "")


def finished(copy):
    """How many of the grid's steps have a record (they ended with exit 0)."""
    jobs = os.path.join(copy, "result", RUN, "jobs")
    return len([name for name in os.listdir(jobs) if name.endswith(".json")]) if os.path.isdir(jobs) else 0


def chaos_run(copy, path, rng):
    """Run the grid in copy with --jobs 2 and kill a running step or the driver at moments rng draws: each once a
    random number of steps have finished, then after a random delay. A kill aimed at a step ("step", "ended") comes
    after at most STEPS - 3 steps, and at once when more have finished meanwhile, so that a step is left to kill even
    when two end together. Rerun the driver until it exits 0. Returns the events (what was killed when, how each
    driver ended) and the number of drivers started."""
    plan = [(kind, rng.randrange(STEPS if kind == "driver" else STEPS - 2), rng.uniform(*DELAY_S)) for kind in KILLS]
    plan = sorted(rng.sample(plan, len(plan)), key=lambda kill: kill[1])
    events, start = [], time.monotonic()
    for drivers in range(1, len(KILLS) + RERUNS + 1):
        driver = grid(copy, path, "--jobs", "2")
        while plan and driver.proc.poll() is None:
            kind, after, delay = plan[0]
            while finished(copy) < after and driver.proc.poll() is None:
                time.sleep(0.02)
            if kind == "driver" or finished(copy) < STEPS - 2:  # else the grid could end first: a step now
                time.sleep(delay)
            if driver.proc.poll() is not None:
                break
            if kind == "driver":
                running = steps_of(driver.proc.pid)
                os.kill(driver.proc.pid, signal.SIGKILL)
                what = f"driver with {len(running)} steps running"
            elif kind == "ended":
                what = kill_the_driver_as_a_step_ends(driver)
            else:
                what = kill_a_step(driver, rng)
            if what:
                plan.pop(0)
                events.append(f"{time.monotonic() - start:.1f}s: killed {what} ({after} steps done)")
            if kind != "step":
                break
        code, _, err = driver.result()
        events.append(f"{time.monotonic() - start:.1f}s: driver {drivers} ended with {code}")
        if code == 0 and not plan:
            return events, drivers
        if code == 0 and any(kind == "step" for kind, _, _ in plan):
            break  # nothing left to kill
    pytest.fail(
        "the grid never completed, or before the last kills:\n"
        + "\n".join(events)
        + f"\n--- last driver's stderr\n{err[-3000:]}"
    )


def checkpoints(copy):
    """{path: sha256} of every file under result/ but the timed ones (TIMED): checkpoints, masks, the split."""
    result, out = os.path.join(copy, "result"), {}
    for folder, dirs, files in os.walk(result):
        dirs[:] = [d for d in dirs if d not in TIMED]
        for name in files:
            if name not in TIMED:
                with open(os.path.join(folder, name), "rb") as f:
                    out[os.path.relpath(os.path.join(folder, name), result)] = hashlib.sha256(f.read()).hexdigest()
    return out


def table(copy):
    """results.csv without the columns that differ between two runs by design (wall time, the scores' file
    names), sorted by configuration."""
    df = pd.read_csv(os.path.join(copy, "results.csv"), dtype=str, keep_default_na=False)
    return df.drop(columns=["defend_time_s", "scores"]).sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the chaos run's copy, its events, drivers started, the reference copy): both runs at once."""
    base = tmp_path_factory.mktemp("chaos")
    path = write_grid(str(base), "chaos.json", **GRID)
    reference, chaos = copy_repo(base / "reference"), copy_repo(base / "chaos")
    uninterrupted = grid(reference, path, "--jobs", "2")
    try:
        events, drivers = chaos_run(chaos, path, random.Random(SEED))
        code, _, err = uninterrupted.result()
    finally:
        if uninterrupted.proc.poll() is None:
            uninterrupted.proc.kill()
    assert code == 0, err
    return chaos, events, drivers, reference


def test_every_kill_landed_and_no_step_outlived_its_driver(runs):
    chaos, events, drivers, _ = runs
    kills = Counter(event.split("killed ")[1].split(" ")[0] for event in events if "killed " in event)
    assert sum(kills.values()) == len(KILLS) and kills["driver"] == len(KILLS) - KILLS.count("step"), events
    assert drivers > kills["driver"], events  # every killed driver was rerun
    assert any(" steps running" in e and " with 0 steps" not in e for e in events), events  # some left orphans
    deadline = time.time() + 30  # a killed driver's steps end on SIGTERM: give them time to close their logs
    while (left := [pid for pid in os.listdir("/proc") if pid.isdigit() and step_of(pid, chaos)]) and (
        time.time() < deadline
    ):
        time.sleep(0.2)
    assert not left, "steps outlived the killed drivers"


def test_results_equal_the_uninterrupted_run(runs):
    chaos, events, _, reference = runs
    want, got = table(reference), table(chaos)
    assert len(want) == 2 and set(want["status"]) == {"ok"}
    assert got.to_dict("records") == want.to_dict("records"), "\n".join(events)


def test_one_full_row_per_configuration(runs):
    df = pd.read_csv(os.path.join(runs[0], "results.csv"))
    assert not df.duplicated(KEY).any(), df[KEY]
    accuracies = [column for column in df.columns if column.endswith("_acc")]  # pretrained, pruned, each attack's
    shown = df[["defense", "setting", "status", *accuracies]]
    assert len(accuracies) == 8 and df["setting"].notna().all() and df[accuracies].notna().all().all(), shown


def test_checkpoints_are_byte_identical(runs):
    chaos, _, _, reference = runs
    want = checkpoints(reference)
    assert sum(name.endswith(".pth") for name in want) == 3 + 2 * 3 * 2  # pretrained; pruned models and masks
    assert checkpoints(chaos) == want


def test_no_staging_folder_or_temp_file_is_left(runs):
    chaos = runs[0]
    left = [
        os.path.relpath(os.path.join(folder, name), chaos)
        for folder, dirs, files in os.walk(chaos)
        for name in dirs + files
        if name.startswith(TRANSIENT[0]) or TRANSIENT[1] in name
    ]
    assert left == []
