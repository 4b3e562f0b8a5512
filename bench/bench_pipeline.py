"""End to end: wall time of `bash run_shell.sh digits` (pretrain, Base + 3 defenses, attacks), step by
step. It runs in a temporary copy of the repo (no data, results or logs), so your result/ and log/
stay untouched. Each `python ...` call is timed by a shim put first on PATH.

python bench/bench_pipeline.py [--script run_shell.sh] [--args digits]
"""

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from common_bench import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = """#!/usr/bin/env bash
start=$(date +%s.%N)
"{python}" "$@"
rc=$?
echo "$start $(date +%s.%N) $*" >> "{record}"
exit $rc
"""


def copy_repo(target):
    keep = lambda d, names: [n for n in names if n in ("result", "log", "data", ".git", "__pycache__")]
    shutil.copytree(REPO, target, ignore=keep)


def run(script, script_args, workdir):
    shim_dir, record = os.path.join(workdir, ".shim"), os.path.join(workdir, ".steps")
    os.makedirs(shim_dir)
    shim = os.path.join(shim_dir, "python")
    with open(shim, "w") as f:
        f.write(SHIM.format(python=sys.executable, record=record))
    os.chmod(shim, os.stat(shim).st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=shim_dir + os.pathsep + os.environ["PATH"])
    start = time.perf_counter()
    subprocess.run(["bash", script] + script_args, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - start
    steps = []
    with open(record) as f:
        for line in f:
            begin, end, command = line.rstrip("\n").split(" ", 2)
            steps.append((command, float(end) - float(begin)))
    return total, steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", default="run_shell.sh", help="a batch script of the repo (or a path)")
    parser.add_argument("--args", default="digits", help="its arguments, space separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "repo")
        copy_repo(workdir)
        script = args.script if os.path.isabs(args.script) else os.path.join(workdir, args.script)
        total, steps = run(script, args.args.split(), workdir)
    rows = [[f"{seconds:.1f}", command[:110]] for command, seconds in steps]
    table(f"bash {args.script} {args.args}: {total:.1f} s in total", ["seconds", "step"], rows)


if __name__ == "__main__":
    main()
