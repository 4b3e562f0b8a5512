"""The import graph of the top-level modules: layers point one way and nothing imports in a circle.

Layer 0 (paths, common) imports nothing of the project; a module imports only from its own layer or
below. Imports inside functions count. Run `python -m pytest -q tests/test_layers.py` after adding a
module: it has to be given a layer here.
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

LAYERS = {
    "paths": 0,
    "common": 0,
    "datasets": 1,
    "models": 1,
    "train": 1,
    "ensemble": 1,
    "progress": 1,
    "auto_settings": 1,
    "splits": 2,
    "pruning": 2,
    "memscores": 2,
    "dp": 2,
    "defenses": 2,
    "attacks": 2,
    "loo_attacks": 2,
    "tuning": 2,
    "search_space": 1,
    "records": 2,
    "intervals": 2,
    "results": 2,
    "report_tables": 2,
    "report_figures": 2,
    "report": 2,
    "grid_step": 2,
    "grid_spec": 2,
    "grid_plan": 2,
    "grid_tracker": 2,
    "grid_local": 2,
    "grid_slurm": 2,
    "audit_plan": 2,
    "audit_report": 2,
    "pretrain_modi": 3,
    "prune_modi": 3,
    "mia_modi": 3,
    "compute_memscore": 3,
    "summarize": 3,
    "grid": 3,
    "audit": 3,
    "audit_common": 3,
    "audit_train": 3,
    "audit_attack": 3,
    "audit_tune": 3,
    "audit_settings": 3,
}


def project_modules():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "*.py")))


def imports_of(module):
    """Project modules that `module` imports anywhere in its file (top level or inside functions)."""
    with open(os.path.join(REPO, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(project_modules()) - {module}


def find_cycle(edges):
    """One import circle as a list of modules (first == last), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    assert set(project_modules()) == set(LAYERS)


def test_imports_point_down_and_never_in_a_circle():
    edges = {m: imports_of(m) for m in project_modules()}
    upward = [(m, dep) for m, deps in edges.items() for dep in deps if LAYERS[dep] > LAYERS[m]]
    assert upward == []
    assert edges["paths"] == set() and edges["common"] == set()
    assert find_cycle(edges) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow
def test_bottom_modules_import_alone():
    """Importing paths or common loads no other project module (checked in a fresh interpreter)."""
    code = "import sys, json; import {0}; print(json.dumps(sorted(m for m in sys.modules if m in {1})))"
    others = json.dumps(project_modules())
    for module in ("paths", "common"):
        out = subprocess.run(
            [sys.executable, "-c", code.format(module, others)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        assert json.loads(out) == [module]


@pytest.mark.slow
def test_a_grid_job_writes_its_record_without_loading_torch(tmp_path):
    """A Slurm job runs grid_step's body and writes its record with common.atomic_write; neither loads torch, whose
    import takes seconds per job."""
    code = (
        "import sys, grid_step; grid_step.write_record(sys.argv[1], {'a': 1}); "
        "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    record = str(tmp_path / "jobs" / "s.json")
    out = subprocess.run(
        [sys.executable, "-c", code, record], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
    with open(record) as f:
        assert json.load(f) == {"a": 1}
