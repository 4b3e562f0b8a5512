"""requirements.txt (what the project needs, as ranges) and constraints.txt (the exact versions the docs' numbers
and CI use, made by tools/make_constraints.sh) agree: every requirement is pinned with == at a version its
range admits, and every pin is a requirement or something a requirement pulls in (read from the installed
packages' metadata, platform markers ignored, extras followed where asked for).
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


def pulled_in(reqs):
    """The requirements and every distribution their installed metadata requires, whatever the platform
    markers say; a dependency under an extra only when that extra was asked for (torch asks cuda-toolkit for
    [cublas, ...])."""
    seen, stack = set(), [(name, req.extras) for name, req in reqs.items()]
    while stack:
        name, extras = stack.pop()
        if (name, tuple(sorted(extras))) in seen:
            continue
        seen.add((name, tuple(sorted(extras))))
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # e.g. a Linux-only CUDA wheel elsewhere: no deps to read
            continue
        for line in requires:
            req = Requirement(line)
            under_extra = req.marker is not None and "extra" in str(req.marker)
            if not under_extra or any(req.marker.evaluate({"extra": extra}) for extra in extras):
                stack.append((canonicalize_name(req.name), req.extras))
    return {name for name, _ in seen}


def test_every_requirement_is_pinned_within_its_range():
    reqs, pins = requirements(), constraints()
    missing = sorted(set(reqs) - set(pins))
    assert not missing, f"in requirements.txt, not pinned in constraints.txt: {missing}; run tools/make_constraints.sh"
    outside = [
        f"{name}=={pins[name]} (requirements.txt: {reqs[name].specifier})"
        for name in sorted(reqs)
        if not reqs[name].specifier.contains(pins[name], prereleases=True)
    ]
    assert not outside, f"pins outside their requirement's range: {outside}; run tools/make_constraints.sh"


def test_every_pin_is_needed():
    stale = sorted(set(constraints()) - pulled_in(requirements()))
    assert not stale, (
        f"pinned in constraints.txt but neither in requirements.txt nor pulled in by it: {stale}; "
        f"run tools/make_constraints.sh"
    )


def test_the_checks_can_fail():
    assert not Requirement("torch<=2.14.1").specifier.contains(Version("2.15.0"))
    assert {"submitit", "cloudpickle"} <= pulled_in({"submitit": Requirement("submitit")})
    assert "pytest" not in pulled_in({"packaging": Requirement("packaging")})
    assert canonicalize_name("Nvidia_ML.py") == "nvidia-ml-py"


def test_pre_commit_runs_the_pinned_ruff():
    with open(os.path.join(REPO, ".pre-commit-config.yaml")) as f:
        revs = re.findall(r"ruff-pre-commit\s*\n\s*rev:\s*v?(\S+)", f.read())
    assert revs == [str(constraints()["ruff"])]
