"""grid.py's plan before anything runs: the order of the steps and the mem-score check over the steps
selected to run (after --only and resume). In-process on the grid files; one subprocess for the CLI's line."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import memscores
from conftest import REPO, as_repo, copy_repo
from gridrun import plan as grid_plan
from gridrun import spec as grid_spec
from gridrun import step as grid_step

RUN = "digits_columnfc"
SCORES = os.path.join("memscore", "memscore_digits_columnfc.csv")


def write_grid(folder, **changes):
    with open(os.path.join(REPO, "grids", "digits.json")) as f:
        data = {
            **json.load(f),
            "original": False,
            "control": False,
            "attacks": "threshold,samia",
            **changes,
        }  # the grid these tests know
    path = os.path.join(folder, "g.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


@pytest.fixture
def no_scores(tmp_path, monkeypatch):
    """The repo's configs, no mem-score files (memscore/ of tmp_path), no job records (result/ of tmp_path)."""
    as_repo(monkeypatch, tmp_path)
    monkeypatch.setattr(grid_step, "RESULT_ROOT", str(tmp_path / "result"))
    monkeypatch.setattr(grid_spec, "REPO", REPO)
    for name in ("config", "grids"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    return tmp_path


def load(folder, **changes):
    grid = grid_spec.Grid(write_grid(str(folder), **changes), "g.json")
    return grid, grid_plan.expand(grid)


def fix():
    cfg = json.load(open(os.path.join(REPO, "config", "digits.json")))
    return memscores.memscore_fix(SimpleNamespace(gpu_id=-1, config_path="config/digits.json", **cfg))


def test_the_fine_tuning_control_is_base_at_sparsity_0_with_the_same_schedule(no_scores):
    """ "control": true adds one Base prune at sparsity 0 (the grid's prune_iter and overrides, so the same
    epochs) and its attack, after the pretraining; a grid that lists sparsity 0 itself gets no second one."""
    _, plain = load(no_scores)
    _, steps = load(no_scores, control=True)
    added = [s for s in steps if s.name not in {p.name for p in plain}]
    assert [s.name for s in added] == [f"{RUN}/prune.iter_prunetxt_0.0", f"{RUN}/attack.iter_prunetxt_0.0"]
    assert [s.name for s in steps[1:3]] == [s.name for s in added]
    base = next(s for s in plain if s.name == f"{RUN}/prune.iter_prunetxt_0.6")
    assert added[0].argv == [a if a != "0.6" else "0.0" for a in base.argv]
    assert "--defend" not in added[0].argv and added[0].needs == [f"{RUN}/pretrain"]
    assert added[0].log == os.path.join("log", RUN, "iter_prunetxt_0.0_base.txt")
    assert added[1].needs == [added[0].name]
    _, listed = load(no_scores, control=True, sparsities=[0.0, 0.6])
    names = [s.name for s in listed]
    assert len(names) == len(set(names)) and names.count(f"{RUN}/prune.iter_prunetxt_0.0") == 1


def test_the_unpruned_attack_follows_its_pretraining(no_scores):
    grid, steps = load(no_scores, original=True, sparsities=[0.5, 0.6])
    names = [step.name.split("/")[1] for step in steps]
    assert names[:4] == ["pretrain", "attack.original", "prune.iter_prunetxt_0.5", "attack.iter_prunetxt_0.5"]
    assert steps[1].needs == [f"{RUN}/pretrain"]
    assert steps[2].after == [f"{RUN}/attack.original"]  # the same log file: the Base prune writes after it
    todo, _ = grid_plan.plan(steps)
    assert todo[1].name == f"{RUN}/attack.original"


def test_a_missing_csv_refuses_the_steps_that_need_it_and_names_the_rest(no_scores):
    grid, steps = load(no_scores, original=True)
    todo, done = grid_plan.plan(steps)
    assert grid_plan.missing_memscores(grid, todo) == [
        f"mem-scores {SCORES} not found (needed by slide_re, ml2, slide_ml2 on config/digits.json); {fix()}; "
        f"the other 4 steps need none: run them first with python grid.py g.json --only '*/pretrain' "
        f"--only '*.original' --only '*.iter_prunetxt_0.6'"
    ]
    rest, _ = grid_plan.plan(steps, ["*/pretrain", "*.original", "*.iter_prunetxt_0.6"])
    assert [s.name.split("/")[1] for s in rest] == [
        "pretrain",
        "attack.original",
        "prune.iter_prunetxt_0.6",
        "attack.iter_prunetxt_0.6",
    ]
    assert grid_plan.missing_memscores(grid, rest) == []


def test_steps_that_need_no_scores_start(no_scores):
    window = {"stride": 1, "width": 15}
    grid, steps = load(
        no_scores, defenses=[{"defend": "base"}, {"defend": "random", **window}, {"defend": "slide", **window}]
    )
    for only in ("*/pretrain", "*attack.iter_prunetxt_0.6", "*_random", "*--defend random*"):
        assert grid_plan.missing_memscores(grid, grid_plan.plan(steps, only)[0]) == []
    assert grid_plan.missing_memscores(grid, grid_plan.plan(steps, "*_slide")[0]) == [
        f"mem-scores {SCORES} not found (needed by slide on config/digits.json); {fix()}; the other step needs "
        f"none: run it first with python grid.py g.json --only '*/pretrain'"
    ]


def test_done_steps_need_no_scores_on_resume(no_scores):
    """A rerun whose mem-score steps have finished (their records match) starts without the CSV; --force,
    which reruns them, needs it again."""
    grid, steps = load(no_scores)
    for step in steps:
        if step.kind != "attack":
            grid_step.write_record(step.record, {"sha256": step.sha256})
    todo, done = grid_plan.plan(steps)
    assert {s.name.split("/")[1] for s in todo} == {s.name.split("/")[1] for s in steps if s.kind == "attack"}
    assert grid_plan.missing_memscores(grid, todo) == []
    todo, _ = grid_plan.plan(steps, force=True)
    line = grid_plan.missing_memscores(grid, todo)[0]
    assert line.endswith(
        "the other 3 steps need none: run them first with python grid.py g.json "
        "--only '*/pretrain' --only '*.iter_prunetxt_0.6'"
    )


@pytest.mark.slow
def test_cli_refuses_before_anything_runs(tmp_path):
    copy = copy_repo(tmp_path / "repo", memscores=False)
    path = write_grid(str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "grid.py", path],
        cwd=copy,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    scores = os.path.join(copy, SCORES)
    assert lines[0].startswith(
        f"error: mem-scores {scores} not found (needed by slide_re, ml2, slide_ml2 on config/digits.json); "
    )
    assert lines[0].endswith(
        f"; the other 3 steps need none: run them first with python grid.py {path} "
        f"--only '*/pretrain' --only '*.iter_prunetxt_0.6'"
    )
    assert not os.path.exists(os.path.join(copy, "log")) and not os.path.exists(os.path.join(copy, "result"))


def test_the_patterns_run_exactly_the_steps_that_need_no_scores(no_scores):
    window = {"stride": 1, "width": 15}
    grid, steps = load(
        no_scores,
        original=True,
        sparsities=[0.5, 0.6],
        defenses=[
            {"defend": "base"},
            {"defend": "random", **window},
            {"defend": "slide", **window},
            {"defend": "ppb", "defend_arg": 4},
        ],
    )
    todo, _ = grid_plan.plan(steps)
    line = grid_plan.missing_memscores(grid, todo)[0]
    patterns = ["*/pretrain", "*.original", "*.iter_prunetxt_0.5", "*.*_random", "*.*_ppb_4.0", "*.iter_prunetxt_0.6"]
    assert line.endswith(
        "the other 14 steps need none: run them first with python grid.py g.json "
        + " ".join(f"--only '{p}'" for p in patterns)
    )
    rest, _ = grid_plan.plan(steps, patterns)
    assert [s.name for s in rest] == [s.name for s in todo if "_slide" not in s.name]
