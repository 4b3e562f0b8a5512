"""auditing/tuning.py: the selection rule on synthetic fronts (ties included), knob values turned into flags,
and an Optuna study that resumes after a kill mid-trial without counting a trial twice."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import search_space
from auditing import tuning
from common import UsageError
from conftest import REPO
from search_space import QUANTILE, SMALLEST_CLASS, Knob


def points(*pairs):
    return [{"acc": acc, "leak": leak, "name": name} for name, acc, leak in pairs]


def test_the_front_keeps_only_the_undominated_points_equal_ones_included():
    p = points(("a", 90, 30), ("b", 88, 20), ("c", 85, 10), ("d", 88, 20), ("e", 80, 5), ("f", 87, 25))
    assert [x["name"] for x in tuning.front(p)] == ["a", "b", "c", "d", "e"]  # f: b is better on both


def test_the_rule_takes_the_least_leaking_setting_at_the_target_ties_to_the_more_accurate_then_the_earlier():
    p = points(("a", 90, 30), ("b", 88, 20), ("c", 85, 10), ("d", 88, 20), ("e", 80, 5))
    assert tuning.choose(p, 88, 1) == (p[1], True)  # b and d tie on both: the earlier; c is under 87
    assert tuning.choose(p, 86, 1) == (p[2], True)  # c reaches 85 exactly (target - tolerance)
    g = points(("b", 88, 20), ("g", 89, 20))
    assert tuning.choose(g, 88, 1) == (g[1], True)  # the same leakage: the more accurate
    assert tuning.choose(p, 95, 1) == (p[0], False)  # none reaches 94: the most accurate, marked
    with pytest.raises(ValueError, match="no trial"):
        tuning.choose([], 88, 1)


def test_knob_values_become_flags_on_the_data_small_and_uneven_classes():
    space = (
        Knob("stride", 0.01, 0.2, log=True, unit=SMALLEST_CLASS),
        Knob("width", 0.05, 0.6, log=True, unit=SMALLEST_CLASS),
        Knob("mem_thre", 0.8, 0.99, unit=QUANTILE),
        Knob("weight_decay_mem", 1e-4, 1.0, log=True),
    )
    scores = np.array([0.0, 0.0, 0.1, 0.2, 0.5, 0.9, 1.0])
    values = {"stride": 0.02, "width": 0.22, "mem_thre": 0.9, "weight_decay_mem": 0.123456}
    # smallest class 3: 0.06 and 0.66 samples round to 0 and 1, and a window is at least 1 sample
    assert search_space.flags_of(space, values, [3, 50, 7], scores) == {
        "stride": 1,
        "width": 1,
        "mem_thre": pytest.approx(0.94),
        "weight_decay_mem": 0.123,
    }
    # digits' smallest class, 19: 0.38 -> 1, 4.18 -> 4; 0.5 of 19 = 9.5 rounds half up to 10
    assert search_space.flags_of(space[:2], {"stride": 0.5, "width": 0.22}, [35, 19, 24]) == {"stride": 10, "width": 4}
    with pytest.raises(ValueError, match="knob width: the range"):
        Knob("width", 0.0, 0.5, log=True)
    with pytest.raises(ValueError, match="knob width: the range"):
        Knob("width", 0.5, 0.5)


SPACE = (Knob("x", 0.1, 10.0, log=True), Knob("y", 0.0, 1.0))

# A worker: runs trials of a cheap two-objective function until the study holds N complete ones; with KILL_AT it
# SIGKILLs itself inside that trial (after the trial started, before it is told), as a killed Slurm job would.
WORKER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import search_space
from auditing import tuning
where, n, kill_at = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
study = tuning.open_study("s", where, seed=3)

def evaluate(values):
    if len(study.trials) - 1 == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return values["x"] * 10, values["y"]

space = (search_space.Knob("x", 0.1, 10.0, log=True), search_space.Knob("y", 0.0, 1.0))
tuning.run_trials(study, n, space, evaluate)
"""


@pytest.mark.slow  # Python subprocesses
@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_study_killed_mid_trial_resumes_without_a_duplicate_trial(tmp_path, storage):
    where = str(tmp_path / "study.log") if storage == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    run = lambda kill_at: subprocess.run(
        [sys.executable, "-c", WORKER, REPO, where, "4", str(kill_at)], capture_output=True, text=True, timeout=120
    )
    killed = run(2)
    assert killed.returncode == -signal.SIGKILL
    study = tuning.open_study("s", where, seed=3)  # this process reclaims the dead one's trial
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert study.trials[3].user_attrs["retry_of"] == 2  # queued with the killed trial's setting
    assert run(-1).returncode == 0
    study = tuning.open_study("s", where, seed=3)
    done = tuning.completed(study)
    assert len(done) == 4 and [t.state.name for t in study.trials].count("COMPLETE") == 4
    assert done[2].params == study.trials[2].params  # the killed setting ran once more, and counts once
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4
    assert all(t.values == [t.params["x"] * 10, t.params["y"]] for t in done)
    assert tuning.reclaim(study, tuning.storage_of(where)) == []  # nothing left running


def test_a_live_workers_trial_is_not_reclaimed_and_the_sampler_is_seeded(tmp_path):
    where = str(tmp_path / "study.log")
    study = tuning.open_study("s", where, seed=3)
    trial = study.ask()
    trial.set_user_attr(tuning.WORKER, tuning.worker_mark())  # this process: alive
    tuning.suggest(trial, SPACE)
    assert tuning.reclaim(study, tuning.storage_of(where)) == []
    other = tuning.open_study("t", where, seed=3)
    again = tuning.open_study("u", str(tmp_path / "other.log"), seed=3)
    first = [tuning.suggest(s.ask(), SPACE) for s in (other, again)]
    assert first[0] == first[1]


def test_refused_settings_are_failed_trials_that_do_not_count(tmp_path):
    study = tuning.open_study("s", str(tmp_path / "study.log"), seed=3)

    def evaluate(values):
        if values["y"] > 0.5:
            raise UsageError("--defend slide_re: the window of epoch 20 starts past every class")
        return 1.0, values["y"]

    ran = tuning.run_trials(study, 3, SPACE, evaluate)
    assert ran == 3 and len(tuning.completed(study)) == 3
    refused = [t for t in study.trials if t.state.name == "FAIL"]
    assert all(t.params["y"] > 0.5 and "past every class" in t.user_attrs["refused"] for t in refused)
    with pytest.raises(UsageError, match=r"6 settings of the search space were refused, the last: --defend"):
        tuning.run_trials(
            tuning.open_study("t", str(tmp_path / "study.log"), seed=3),
            3,
            SPACE,
            lambda values: (_ for _ in ()).throw(UsageError("--defend slide_re: the window ...")),
        )
    assert os.path.isfile(tmp_path / "study.log")


def test_every_defense_declares_its_search_space_in_flags_it_has():
    """Each registered defense's knobs: the flag, range, scale and unit, exactly; every flag is one of the defense
    flags (add_defense_flags), and `auto`'s point (auto_settings) lies inside the window and threshold ranges."""
    import argparse

    import auto_settings
    from defenses import DEFENSES, add_defense_flags

    window = [("stride", 0.01, 0.2, True, SMALLEST_CLASS), ("width", 0.05, 0.6, True, SMALLEST_CLASS)]
    risk = [("mem_thre", 0.8, 0.99, False, QUANTILE), ("weight_decay_mem", 1e-4, 1.0, True, "")]
    arg = lambda low, high: [("defend_arg", low, high, True, "")]
    expected = {
        "base": [],
        "slide": window,
        "slide_re": window,
        "random": window,
        "ml2": risk,
        "slide_ml2": window + risk,
        "slide_re_ml2": window + risk,
        "ppb": arg(0.5, 32.0),
        "relaxloss": arg(0.05, 2.0),
        "adv": arg(0.5, 16.0),
        "dp": arg(0.25, 16.0),
    }
    spaces = {
        name: [(k.flag, k.low, k.high, k.log, k.unit) for k in cls.search_space] for name, cls in DEFENSES.items()
    }
    assert spaces == expected
    parser = argparse.ArgumentParser()
    add_defense_flags(parser)
    flags = {a.dest for a in parser._actions}
    assert {k.flag for cls in DEFENSES.values() for k in cls.search_space} <= flags
    shares = {"stride": auto_settings.STRIDE_PERCENT / 100, "width": auto_settings.WIDTH_PERCENT / 100}
    for flag, low, high, _, _ in window:
        assert low < shares[flag] < high
    assert risk[0][1] < auto_settings.MEM_QUANTILE < risk[0][2]


# Worker K of W: runs its share of N trials of a cheap function on the study (each takes 0.2 s, so that the workers'
# trials overlap).
SHARE_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import search_space
from auditing import tuning
where, n, worker = sys.argv[2], int(sys.argv[3]), tuning.worker_type(sys.argv[4])
study = tuning.open_study("s", where, seed=3, worker=worker)

def evaluate(values):
    time.sleep(0.2)
    return values["x"] * 10, values["y"]

space = (search_space.Knob("x", 0.1, 10.0, log=True), search_space.Knob("y", 0.0, 1.0))
tuning.run_trials(study, n, space, evaluate, worker)
"""


@pytest.mark.slow  # Python subprocesses
def test_workers_run_their_shares_at_once_on_one_study_and_draw_no_setting_twice(tmp_path):
    where = str(tmp_path / "study.log")
    workers = [
        subprocess.Popen([sys.executable, "-c", SHARE_WORKER, REPO, where, "7", f"{k}/2"], stderr=subprocess.PIPE)
        for k in (1, 2)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0], [w.stderr.read() for w in workers]
    study = tuning.open_study("s", where, seed=3)
    done = tuning.completed(study)
    assert len(done) == len(study.trials) == 7  # nothing failed, nothing left running
    assert [len(tuning.completed(study, slot)) for slot in ("1/2", "2/2")] == [4, 3]
    assert len({tuple(sorted(t.params.items())) for t in done}) == 7
    running = lambda t: (t.datetime_start, t.datetime_complete)
    spans = {slot: [running(t) for t in done if t.user_attrs[tuning.SLOT] == slot] for slot in ("1/2", "2/2")}
    overlap = any(a0 < b1 and b0 < a1 for a0, a1 in spans["1/2"] for b0, b1 in spans["2/2"])
    assert overlap  # the two ran at the same time
    assert tuning.run_trials(study, 7, SPACE, lambda values: (0.0, 0.0)) == 0  # the chooser: the study is full


def test_worker_slots_share_the_trials_and_seed_the_sampler_apart(tmp_path):
    assert [tuning.Worker(k, 3).share(7) for k in (1, 2, 3)] == [3, 2, 2]
    assert [tuning.Worker(k, 3).share(2) for k in (1, 2, 3)] == [1, 1, 0]
    assert tuning.worker_type("2/4") == tuning.Worker(2, 4) and tuning.Worker().slot == "1/1"
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        with pytest.raises(Exception, match="is not K/W with 1 <= K <= W"):
            tuning.worker_type(bad)
    first = [
        tuning.suggest(tuning.open_study(f"s{k}", str(tmp_path / f"{k}.log"), 3, tuning.Worker(k, 2)).ask(), SPACE)
        for k in (1, 2)
    ]
    assert first[0] != first[1]  # one seed, two workers: two first settings


def test_a_slots_trial_left_running_on_another_host_is_reclaimed_by_that_slot_only(tmp_path):
    where = str(tmp_path / "study.log")
    study = tuning.open_study("s", where, seed=3)
    trial = study.ask()
    trial.set_user_attr(tuning.WORKER, "another-node-4242")  # a Slurm job requeued from another node
    trial.set_user_attr(tuning.SLOT, "1/2")
    tuning.suggest(trial, SPACE)
    storage = tuning.storage_of(where)
    assert tuning.reclaim(study, storage, tuning.Worker(2, 2)) == []  # another slot's: alive as far as it knows
    assert tuning.reclaim(study, storage) == []  # a process alone cannot tell
    assert tuning.reclaim(study, storage, tuning.Worker(1, 2)) == [0]
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
