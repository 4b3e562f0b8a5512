"""grid.py on an audit grid (an "audit" section: audit.py's steps, docs/audit.md): the steps and their order, the
section's checks, --dry_run, and a tiny audit run by the local pool that gives audit.py all's audit.csv and
reruns nothing."""

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from auditing import plan as audit_plan
from common import UsageError
from conftest import REPO, copy_repo, run_script
from gridrun import plan as grid_plan
from gridrun import spec as grid_spec

RUN = "digits_columnfc"
DEFENSES = [{"defend": "base"}, {"defend": "slide_re", "width": 5, "stride": 1}]
TINY_AUDIT = {
    "models": 4,
    "group_size": 2,
    "canaries": 8,
    "prune_epochs": 2,
    "bootstrap": 50,
    "with_dp": True,
    "tune": {"trials": 2, "tuning_models": 3, "target_acc": 80.0},
}
TINY_GRID = {
    "configs": ["config/digits.json"],
    "pruners": "iter_prunetxt",
    "sparsities": [0.6],
    "prune_iter": 2,
    "audit": TINY_AUDIT,
    "overrides": {"audit": {"epochs": 2, "batch_size": 64, "no_tensorboard": True}},
    "defenses": DEFENSES,
}
# audit.py all with the tiny grid's settings
TINY_ALL = [
    *("--models", "4", "--group_size", "2", "--canaries", "8", "--epochs", "2", "--batch_size", "64"),
    *("--pruner_name", "iter_prunetxt", "--prune_sparsity", "0.6", "--prune_iter", "2", "--prune_epochs", "2"),
    *("--defense", "base", "--defense", "slide_re:stride=1,width=5", "--bootstrap", "50"),
    *("--with_dp", "--trials", "2", "--tuning_models", "3", "--target_acc", "80"),
    *("--quiet", "--no_tensorboard"),
]


def grid_of(tmp_path, monkeypatch, **changes):
    monkeypatch.chdir(REPO)
    path = tmp_path / "audit.json"
    grid = {**TINY_GRID, **changes}
    path.write_text(json.dumps({k: v for k, v in grid.items() if v is not None}))
    return grid_spec.Grid(str(path), "audit.json")


def test_the_audit_grid_plans_audit_steps_in_dependency_order(tmp_path, monkeypatch):
    grid = grid_of(tmp_path, monkeypatch)
    steps = grid_plan.expand(grid)
    listed = audit_plan.audit_steps(
        "config/digits.json",
        "GPU-ID",
        4,
        2,
        ["--canaries", "8"],
        [{"defend": "base"}, {"defend": "slide_re", "stride": 1, "width": 5}],
        ["--pruner_name", "iter_prunetxt", "--prune_sparsity", "0.6", "--prune_iter", "2", "--prune_epochs", "2"],
        True,
        ["--bootstrap", "50"],
        ["--epochs", "2", "--batch_size", "64", "--no_tensorboard", "--quiet"],
        tune=["--trials", "2", "--tuning_models", "3", "--target_acc", "80.0"],
    )
    assert [s.name for s in steps] == [f"{RUN}/audit.{a.name}" for a in listed]
    assert [s.argv for s in steps] == [a.argv for a in listed]
    assert [s.name.split("/audit.")[1] for s in steps] == [
        "prepare",
        "pretrain.g0",
        "pretrain.g1",
        "memscore",
        "attack.unpruned",
        "prune.0.base.g0",
        "prune.0.base.g1",
        "attack.0.base",
        "prune.1.slide_re_stride1_width5.g0",
        "prune.1.slide_re_stride1_width5.g1",
        "attack.1.slide_re_stride1_width5",
        "tune.base.corrected",
        "tune.dp",
        "prune.dp.g0",
        "prune.dp.g1",
        "attack.dp",
        "summarize",
    ]
    seen = set()
    for step in steps:  # every step comes after what it needs
        assert step.kind == "audit" and set(step.needs) <= seen
        seen.add(step.name)
    assert set(steps[-1].needs) == {s.name for s in steps if "/audit.attack." in s.name}
    assert steps[2].command("-1") == (
        "python audit.py pretrain -1 config/digits.json --group 1 --group_size 2 --epochs 2 --batch_size 64 "
        "--no_tensorboard --quiet"
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"audit": {"modles": 4}}, "audit: unknown key 'modles'"),
        ({"audit": {"models": "4"}}, "audit.models: must be int"),
        ({"audit": {"dp": {"noise": "1"}}}, "audit.dp: tune_dp's noise grid is retired: with_dp tunes dp as every"),
        ({"audit": {"tune": {"workers": 0}}}, "audit.tune.workers: must be an int >= 1, got 0"),
        ({"audit": {"tune": {"target_acc": "80"}}}, "audit.tune.target_acc: must be a number, got '80'"),
        ({"audit": {"canaries": 4, "audit_top_memscore": 4}}, "canaries or audit_top_memscore, not both"),
        ({"audit": {}}, "key 'audit': must name at least one setting"),
        ({"sparsities": [0.5, 0.6]}, "an audit grid takes one sparsity"),
        ({"overrides": {"audit": {"models": 4}}}, "--models is a key of the audit section"),
        ({"audit": {"tune": {"trails": 4}}}, "audit.tune: unknown key 'trails'"),
        ({"defenses": [{"defend": "base", "tuned": True}]}, '"tuned": true stands alone (or with "semantics"), in an'),
        ({"defenses": [{"defend": "slide_re", "tuned": True, "stride": 1}]}, '"tuned": true stands alone'),
        ({"audit": None, "defenses": [{"defend": "slide_re", "tuned": True}]}, '"tuned": true stands alone'),
        ({"audit": {"tune": {"trials": 0}}}, "audit.tune.trials: must be an int >= 1, got 0"),
        ({"audit": {"control": True}, "sparsities": [0.0]}, "audit.control: adds Base at sparsity 0"),
        ({"control": True}, 'an audit grid takes the control in its audit section: "audit": {"control": true}'),
    ],
)
def test_bad_audit_sections_are_refused(tmp_path, monkeypatch, changes, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        grid_of(tmp_path, monkeypatch, **changes)


@pytest.mark.slow
def test_dry_run_lists_the_audit_steps(tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(TINY_GRID))
    out = run_script("grid.py", str(path), "--dry_run", cwd=tmp_path).stdout
    lines = out.splitlines()
    assert "17 steps (pretrain 0, prune 0, attack 0, audit 17)" in lines[1]
    names = [line[2:] for line in lines if line.startswith(f"# {RUN}/")]
    commands = [line for line in lines if line.startswith("python ")]
    assert names[0] == f"{RUN}/audit.prepare" and names[-1] == f"{RUN}/audit.summarize" and len(names) == 17
    assert commands[0] == "python audit.py prepare -1 config/digits.json --models 4 --canaries 8 " + (
        "--epochs 2 --batch_size 64 --no_tensorboard --quiet"
    )
    assert all(c.startswith("python audit.py ") for c in commands) and len(commands) == 17


@pytest.mark.slow
def test_a_tiny_audit_grid_gives_audit_py_alls_table_and_a_rerun_does_nothing(tmp_path):
    copy = copy_repo(str(tmp_path / "repo"))
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(TINY_GRID))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    grid = [sys.executable, os.path.join(copy, "grid.py"), str(path), "--jobs", "2"]
    first = subprocess.run(grid, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "17 steps to run: 17 done, 0 failed, 0 skipped" in first.stderr
    alone = tmp_path / "alone"
    alone.mkdir()
    run_script("audit.py", "all", "-1", os.path.join(copy, "config", "digits.json"), *TINY_ALL, cwd=alone, repo=copy)
    table = os.path.join(RUN, "audit", "audit.csv")
    by_grid = pd.read_csv(os.path.join(copy, "result", table))
    by_all = pd.read_csv(alone / "result" / table)
    assert by_grid["defense"].tolist() == ["unpruned", "base", "slide_re", "dp"]
    pd.testing.assert_frame_equal(by_grid, by_all)
    jobs = os.path.join(copy, "result", RUN, "jobs")
    stamps = {name: os.path.getmtime(os.path.join(jobs, name)) for name in os.listdir(jobs)}
    csv_stamp = os.path.getmtime(os.path.join(copy, "result", table))
    again = subprocess.run(grid, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 steps to run: 0 done, 0 failed, 0 skipped; 17 done before were not rerun" in again.stderr
    assert {name: os.path.getmtime(os.path.join(jobs, name)) for name in os.listdir(jobs)} == stamps
    assert os.path.getmtime(os.path.join(copy, "result", table)) == csv_stamp


def test_the_comparison_grid_tunes_every_defense_with_a_search_space_and_adds_the_control(monkeypatch):
    """grids/digits_compare.json: per seed (7, 8, 9) one tune step per defense with a search space (after prepare),
    whose prunes and attacks read its choice (--tuned, the same --tuning_models), and the fine-tuning control."""
    from defenses import DEFENSES

    monkeypatch.chdir(REPO)
    grid = grid_spec.Grid(os.path.join(REPO, "grids", "digits_compare.json"), "grids/digits_compare.json")
    steps = grid_plan.expand(grid)
    tunes = [s for s in steps if "/audit.tune." in s.name and ".tune.base" not in s.name]
    tunable = {name for name, cls in DEFENSES.items() if cls.search_space}
    entries = [(i, e["defend"]) for i, e in enumerate(grid["defenses"]) if e.get("tuned")]
    assert {name for _, name in entries} == tunable
    label = lambda i, name: f"{name}_semanticscorrected" if name == "dp" else name  # dp: DP-SGD as corrected
    runs = ["digits_columnfc", "digits_columnfc_seed8", "digits_columnfc_seed9"]
    expected = [f"{run}/audit.tune.{i}.{label(i, name)}_tuned" for run in runs for i, name in entries]
    assert sorted(s.name for s in tunes) == sorted(expected)
    for tune in tunes:
        base = "/audit.tune.base" + (".corrected" if "dp_" in tune.name else "")
        assert tune.needs == [tune.name.split("/")[0] + base]
        assert tune.argv[tune.argv.index("--trials") :][:4] == ["--trials", "10", "--tuning_models", "16"]
    corrected = [s for s in steps if s.name.endswith("/audit.tune.base.corrected")]
    assert len(corrected) == 3 and all(s.needs == [s.name.removesuffix(".corrected")] for s in corrected)
    prunes = [s for s in steps if "/audit.prune." in s.name and "_tuned" in s.name]
    after_tuned = lambda argv: argv[argv.index("--tuned") + 1 : argv.index("--tuned") + 3]
    assert prunes and all(after_tuned(s.argv) == ["--tuning_models", "16"] for s in prunes)
    controls = [s for s in steps if s.name.endswith("/audit.attack.control")]
    last_sparsity = lambda argv: argv[len(argv) - 1 - argv[::-1].index("--prune_sparsity") + 1]  # argparse: last wins
    assert len(controls) == 3 and all(last_sparsity(s.argv) == "0.0" for s in controls)


def test_a_tuned_defense_given_twice_is_one_run(tmp_path, monkeypatch):
    twice = [{"defend": "base"}, {"defend": "slide_re", "tuned": True}, {"defend": "slide_re", "tuned": True}]
    steps = grid_plan.expand(grid_of(tmp_path, monkeypatch, defenses=twice, audit={**TINY_AUDIT, "with_dp": False}))
    assert [s.name.split("/")[1] for s in steps if "/audit.tune." in s.name] == [
        "audit.tune.base",
        "audit.tune.1.slide_re_tuned",
    ]


def test_tune_workers_split_a_study_into_steps_and_one_chooses_after_them(tmp_path, monkeypatch):
    """ "tune": {"workers": 2}: each tuned defense's trials run in 2 steps (--worker 1/2, 2/2) after tune.base, and
    its tune step, the one that writes the chosen setting, comes after both; the prunes read that."""
    entries = [{"defend": "base"}, {"defend": "slide_re", "tuned": True}]
    grid = grid_of(
        tmp_path, monkeypatch, defenses=entries, audit={**TINY_AUDIT, "with_dp": False, "tune": {"workers": 2}}
    )
    steps = {s.name.split("/audit.")[1]: s for s in grid_plan.expand(grid)}
    name = "tune.1.slide_re_tuned"
    assert [n for n in steps if n.startswith("tune.")] == ["tune.base", f"{name}.w1", f"{name}.w2", name]
    for k in (1, 2):
        worker = steps[f"{name}.w{k}"]
        assert worker.needs == [f"{RUN}/audit.tune.base"]
        assert worker.argv[worker.argv.index("--worker") + 1] == f"{k}/2"
    assert (
        steps[name].needs == [f"{RUN}/audit.{name}.w1", f"{RUN}/audit.{name}.w2"] and "--worker" not in steps[name].argv
    )
    assert steps["prune.1.slide_re_tuned.g0"].needs == [f"{RUN}/audit.memscore", f"{RUN}/audit.{name}"]
