"""requirements.txt (what the project needs, as ranges) and constraints.txt (the exact versions the docs' numbers
and CI use, made by tools/make_constraints.sh) agree: every requirement is pinned with == at a version its
range admits, and every pin is a requirement or something a requirement pulls in (read from the installed
packages' metadata, markers of every platform counted, so the pins of Linux-only CUDA wheels stay valid).
pre-commit runs the pinned ruff."""
import importlib.metadata
import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO


def lines(name):
    with open(os.path.join(REPO, name)) as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def requirements():
    return {canonicalize_name(req.name): req for req in map(Requirement, lines("requirements.txt"))}


def constraints():
    pins = {}
    for line in lines("constraints.txt"):
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[\w.!+-]+", version.strip()), f"constraints.txt: {line!r} is not name==version"
        pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def pulled_in(names):
    """names and every distribution their installed metadata requires, whatever the markers say (but extras)."""
    seen, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # e.g. a Linux-only CUDA wheel elsewhere: no deps to read
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or "extra" not in str(req.marker):
                stack.append(canonicalize_name(req.name))
    return seen


def test_every_requirement_is_pinned_within_its_range():
    reqs, pins = requirements(), constraints()
    missing = sorted(set(reqs) - set(pins))
    assert not missing, f"in requirements.txt, not pinned in constraints.txt: {missing}; run tools/make_constraints.sh"
    outside = [f"{name}=={pins[name]} (requirements.txt: {reqs[name].specifier})" for name in sorted(reqs)
               if not reqs[name].specifier.contains(pins[name], prereleases=True)]
    assert not outside, f"pins outside their requirement's range: {outside}; run tools/make_constraints.sh"


def test_every_pin_is_needed():
    stale = sorted(set(constraints()) - pulled_in(requirements()))
    assert not stale, (f"pinned in constraints.txt but neither in requirements.txt nor pulled in by it: {stale}; "
                       f"run tools/make_constraints.sh")


def test_the_checks_can_fail():
    assert not Requirement("torch<=2.14.1").specifier.contains(Version("2.15.0"))
    assert "submitit" in pulled_in({"submitit"}) and "cloudpickle" in pulled_in({"submitit"})
    assert canonicalize_name("Nvidia_ML.py") == "nvidia-ml-py"


def test_pre_commit_runs_the_pinned_ruff():
    with open(os.path.join(REPO, ".pre-commit-config.yaml")) as f:
        revs = re.findall(r"ruff-pre-commit\s*\n\s*rev:\s*v?(\S+)", f.read())
    assert revs == [str(constraints()["ruff"])]
