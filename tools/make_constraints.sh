#!/usr/bin/env bash
# Regenerate constraints.txt: the exact version of every package that `pip install -r requirements.txt`
# brings into a fresh virtual environment (requirements.txt's own packages and everything they pull in),
# as `pip freeze` writes them. Run it after changing requirements.txt, then rerun the tests and the
# numbers in the docs that depend on versions:
#   bash tools/make_constraints.sh [PYTHON]      (PYTHON: the interpreter to build the venv with; default python3)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-python3}
venv=$(mktemp -d /tmp/wemem-constraints.XXXXXX)
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q -r "$repo/requirements.txt"
{
    echo "# Exact versions the docs' numbers and CI use; made by tools/make_constraints.sh with"
    echo "# $("$venv/bin/python" -c 'import platform; print("Python", platform.python_version(), "on", platform.machine())')"
    echo "# from requirements.txt. Install: pip install -r requirements.txt -c constraints.txt"
    # without local version labels (torch==2.14.1+cu130 -> torch==2.14.1): the pin then also matches the
    # index's own build of that release; pip, setuptools and wheel are the venv's, not the project's
    "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -E '^(pip|setuptools|wheel)==' \
        | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > "$repo/constraints.txt.tmp"
mv "$repo/constraints.txt.tmp" "$repo/constraints.txt"
echo "wrote $repo/constraints.txt ($(grep -c '==' "$repo/constraints.txt") packages)"
