"""The import graph of the project's modules: layers point one way, the families sit on the pipeline, and
nothing imports in a circle.

The modules are those in the repo root (the pipeline, and the entry points on top) and those of the family
packages (FAMILIES; gridrun/spec.py is `gridrun.spec`). Layer 0 (paths, common) imports nothing of the
project; a module imports only from its own layer or below. A family sits on top of the pipeline: no root
module but an entry point imports from a family; a family imports root modules and its own modules, and
another family only where FAMILY_IMPORTS says so. Imports inside functions count. Run
`python -m pytest -q tests/test_layers.py` after adding a module: it has to be given a layer here.
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# The packages that group a family of modules over the pipeline (nothing in the pipeline imports them).
FAMILIES = ("gridrun", "reporting", "auditing")
# family -> the other families it may import (an audit grid lists the audit's steps)
FAMILY_IMPORTS = {"gridrun": ("auditing",)}
# The scripts run from the command line: the top layer, and the only root modules that import from a family.
ENTRY_POINTS = {"pretrain_modi", "prune_modi", "mia_modi", "compute_memscore", "summarize", "grid", "audit"}
LAYERS = {
    "paths": 0,
    "common": 0,
    "datasets": 1,
    "models": 1,
    "train": 1,
    "auditing.ensemble": 1,
    "progress": 1,
    "auto_settings": 1,
    "splits": 2,
    "pruning": 2,
    "memscores": 2,
    "dp": 2,
    "defenses": 2,
    "attacks": 2,
    "auditing.loo_attacks": 2,
    "auditing.tuning": 2,
    "search_space": 1,
    "records": 2,
    "intervals": 2,
    "reporting.results": 2,
    "reporting.tables": 2,
    "reporting.figures": 2,
    "reporting.report": 2,
    "gridrun.step": 2,
    "gridrun.spec": 2,
    "gridrun.plan": 2,
    "gridrun.tracker": 2,
    "gridrun.local": 2,
    "gridrun.slurm": 2,
    "auditing.plan": 2,
    "auditing.report": 2,
    "pretrain_modi": 3,
    "prune_modi": 3,
    "mia_modi": 3,
    "compute_memscore": 3,
    "summarize": 3,
    "grid": 3,
    "audit": 3,
    "auditing.shared": 3,
    "auditing.train": 3,
    "auditing.attack": 3,
    "auditing.tune": 3,
    "auditing.settings": 3,
}


def project_modules():
    """The root modules by name, then each family's modules as `family.module` (its __init__ left out)."""
    found = [os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "*.py"))]
    for family in FAMILIES:
        found += [
            f"{family}.{os.path.splitext(os.path.basename(p))[0]}"
            for p in glob.glob(os.path.join(REPO, family, "*.py"))
            if os.path.basename(p) != "__init__.py"
        ]
    return sorted(found)


def module_file(module):
    return os.path.join(REPO, *module.split(".")) + ".py"


def family_of(module):
    """The family a module (or a family package itself) belongs to; None for a root module."""
    head = module.split(".")[0]
    return head if head in FAMILIES else None


def imported_names(tree, package=""):
    """Dotted names a module's syntax tree imports (top level or inside functions): `import a.b` gives a.b, `from a
    import b` a.b (b a module of package a, or a name in module a); package resolves relative imports (`from . import
    b` inside package a gives a.b)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = [node.module] if node.module else []
            if node.level:
                above = package.split(".") if package else []
                parts = above[: len(above) - (node.level - 1)] + parts
            names |= {".".join(parts + [alias.name]) for alias in node.names}
    return names


def resolve(names, modules):
    """The project modules among dotted import names, each by its longest prefix that is one (a.b.c: a.b when a.b is
    a module); a family package imported as a whole by its name."""
    found = set()
    for name in names:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in modules or prefix in FAMILIES:
                found.add(prefix)
                break
    return found


def imports_of(module):
    """Project modules that `module` imports anywhere in its file (top level or inside functions); a family
    package imported as a whole (`import gridrun`) appears by its name."""
    with open(module_file(module)) as f:
        tree = ast.parse(f.read())
    return resolve(imported_names(tree, module.rpartition(".")[0]), set(project_modules())) - {module}


def upward(edges, layers):
    """(module, import) pairs where the import is in a higher layer (a family package as a whole: none)."""
    return sorted((m, dep) for m, deps in edges.items() for dep in deps if dep in layers and layers[dep] > layers[m])


def outside_the_family_rule(edges):
    """(module, import) pairs that break the family rule: a root module other than an entry point imports from a
    family, or a family imports another one that FAMILY_IMPORTS does not give it."""
    broken = []
    for m, deps in edges.items():
        for dep in deps:
            own, other = family_of(m), family_of(dep)
            if other is None or other == own:
                continue
            if (own is None and m in ENTRY_POINTS) or other in FAMILY_IMPORTS.get(own, ()):
                continue
            broken.append((m, dep))
    return sorted(broken)


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
    assert ENTRY_POINTS <= set(LAYERS)
    assert {LAYERS[m] for m in ENTRY_POINTS} == {max(LAYERS.values())}  # the entry points are the top layer


def test_the_families_are_packages_that_import_nothing():
    """Each family is a package whose __init__.py is a docstring alone (importing it loads nothing); every package
    in the repo root is a family."""
    packages = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "*", "__init__.py"))}
    assert packages == set(FAMILIES)
    assert set(FAMILY_IMPORTS) <= set(FAMILIES)
    for family in FAMILIES:
        with open(os.path.join(REPO, family, "__init__.py")) as f:
            body = ast.parse(f.read()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_imports_point_down_and_never_in_a_circle():
    edges = {m: imports_of(m) for m in project_modules()}
    assert upward(edges, LAYERS) == []
    assert outside_the_family_rule(edges) == []
    assert all(edges[m] == set() for m in LAYERS if LAYERS[m] == 0)
    assert find_cycle({m: {dep for dep in deps if dep in edges} for m, deps in edges.items()}) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_rule_finders_find_an_upward_import(monkeypatch):
    """A pipeline module importing a family's module, a family importing another, and an import into a higher
    layer are each found; an entry point's and a family's own imports are not."""
    monkeypatch.setattr(sys.modules[__name__], "FAMILIES", ("fam", "other"))
    monkeypatch.setattr(sys.modules[__name__], "FAMILY_IMPORTS", {"other": ("fam",)})
    monkeypatch.setattr(sys.modules[__name__], "ENTRY_POINTS", {"script"})
    edges = {
        "low": {"fam.a"},  # the pipeline imports a family: broken
        "mid": {"fam"},  # a family package as a whole: broken too
        "script": {"fam.a", "low"},
        "fam.a": {"fam.b", "low", "other.c"},  # fam may not import other
        "fam.b": {"low"},
        "other.c": {"fam.b"},  # other may import fam
    }
    assert outside_the_family_rule(edges) == [("fam.a", "other.c"), ("low", "fam.a"), ("mid", "fam")]
    layers = {"low": 0, "mid": 0, "script": 2, "fam.a": 1, "fam.b": 1, "other.c": 1}
    assert upward(edges, layers) == [("low", "fam.a")]


def test_imports_are_read_in_every_form(monkeypatch):
    """`import a.b`, `from a import b`, `from a.b import c` and, inside package a, `from . import b` and `from .b
    import c` all name module a.b; a root module goes by its name, and so does a family package imported whole."""
    monkeypatch.setattr(sys.modules[__name__], "FAMILIES", ("fam",))
    code = """
import os, grid
import fam.one
from fam import two as fam_two
from fam.three import thing
from . import four
from .five import other
from paths import LOG_ROOT
import fam


def f():
    from records import find_records
"""
    modules = {"grid", "paths", "records"} | {f"fam.{n}" for n in ("one", "two", "three", "four", "five")}
    assert resolve(imported_names(ast.parse(code), "fam"), modules) == {"fam"} | modules
    assert resolve(imported_names(ast.parse("from fam import ATTRIBUTE"), "grid"), modules) == {"fam"}


@pytest.mark.slow
def test_bottom_modules_import_alone():
    """Importing a module of layer 0 (paths, common) loads no other project module (checked in a fresh
    interpreter)."""
    code = "import sys, json; import {0}; print(json.dumps(sorted(m for m in sys.modules if m in {1})))"
    others = json.dumps(project_modules() + list(FAMILIES))
    for module in sorted(m for m in LAYERS if LAYERS[m] == 0):
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
    """A Slurm job runs gridrun.step's body and writes its record with common.atomic_write; neither loads torch, whose
    import takes seconds per job."""
    code = (
        "import sys; from gridrun import step as grid_step; grid_step.write_record(sys.argv[1], {'a': 1}); "
        "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    record = str(tmp_path / "jobs" / "s.json")
    out = subprocess.run(
        [sys.executable, "-c", code, record], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
    with open(record) as f:
        assert json.load(f) == {"a": 1}
