"""Wall time of the defense comparison (docs/audit.md: The digits comparison): `python grid.py
grids/digits_compare.json --jobs 2` in a copy of the repo, then the seconds its steps took by kind (tune,
pretrain, prune, attack, ...; each step's own wall time, from the grid's job records). The copy keeps result/
and log/ for the tables (--keep DIR; else a temporary folder that is removed).

python bench/bench_compare.py [--keep DIR] [--jobs 2] [--grid grids/digits_compare.json]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from common_bench import table

from bench_grid import copy_repo


def step_seconds(copy: str) -> dict:
    """{kind: (steps, seconds)} from result/*/jobs/*.json: the audit step's name (audit.<kind>...)."""
    found = defaultdict(lambda: [0, 0.0])
    for path in glob.glob(os.path.join(copy, "result", "*", "jobs", "*.json")):
        with open(path) as f:
            record = json.load(f)
        kind = record["step"].split("/")[-1].split(".")[1 if "/audit." in record["step"] else 0]
        found[kind][0] += 1
        found[kind][1] += record["seconds"]
    return dict(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (a copy of the repo is made there) and keep it")
    parser.add_argument("--jobs", default="2")
    parser.add_argument("--grid", default=os.path.join("grids", "digits_compare.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy = copy_repo(args.keep or os.path.join(tmp, "repo"))
        start = time.monotonic()
        code = subprocess.run([sys.executable, "grid.py", args.grid, "--jobs", args.jobs], cwd=copy).returncode
        wall = time.monotonic() - start
        seconds = step_seconds(copy)
    rows = [(kind, n, f"{s:.0f}") for kind, (n, s) in sorted(seconds.items(), key=lambda kv: -kv[1][1])]
    table(f"the steps of {args.grid}, by kind", ["step kind", "steps", "seconds (sum)"], rows)
    print(f"python grid.py {args.grid} --jobs {args.jobs}: {wall:.0f} s wall ({wall / 60:.1f} min), exit {code}")
    print(f"steps' seconds together: {sum(s for _, s in seconds.values()):.0f} s on {os.cpu_count()} cores")
    sys.exit(code)


if __name__ == "__main__":
    main()
