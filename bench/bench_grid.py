"""Wall time of `bash run_shell.sh digits` (one step after the other) against `python grid.py grids/digits.json
--jobs 2` (two steps at a time), the same nine commands, each in its own temporary copy of the repo; then
checks that their logs hold the same numbers (the defend-time lines, wall clock, aside). The full run takes
about 20 minutes on a 2-core CPU.

python bench/bench_grid.py [--tiny] [--keep DIR]

--tiny: the tests' small settings (2 pretraining epochs, 2 pruning iterations of 2 epochs, one shadow, the
threshold attacks, no TensorBoard), for a check in a minute or two: a `python` shim first on PATH appends
them to run_shell.sh's commands (the last of a repeated flag wins), and grid.py gets them in a derived grid.
"""

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "digits_columnfc"
RESULT_LINE = re.compile(r"Accuracy|accuracy|Loss|AUC|TPR@|epsilon")  # not: defend time, file names
TINY_FLAGS = {
    "pretrain_modi.py": "--epochs 2 --shadow_num 1 --no_tensorboard",
    "prune_modi.py": "--prune_iter 2 --prune_epochs 2 --shadow_num 1 --no_tensorboard",
    "mia_modi.py": "--attacks threshold --shadow_num 1",
}
TINY_GRID = {
    "prune_iter": 2,
    "shadow_num": 1,
    "attacks": "threshold",
    "overrides": {
        "pretrain": {"epochs": 2, "no_tensorboard": True},
        "prune": {"prune_epochs": 2, "no_tensorboard": True},
    },
}
SHIM = """#!/usr/bin/env bash
case "$1" in
{cases}
esac
exec "{python}" "$@" $extra
"""


def copy_repo(target):
    """The files git knows (tracked and not ignored) and the shipped mem-scores: no results, logs or data."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for name in set(filter(None, listed)) | {"memscore/memscore_digits_columnfc.csv"}:
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(target, name))
    return target


def timed(cmd, cwd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - start


def log_numbers(copy):
    """The result lines of every log of the run (defend-time lines, wall clock, aside)."""
    folder = os.path.join(copy, "log", RUN)
    return {
        name: [
            line
            for line in open(os.path.join(folder, name)).read().splitlines()
            if RESULT_LINE.search(line) and "defend time" not in line
        ]
        for name in sorted(os.listdir(folder))
        if name.endswith(".txt")
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' small settings (a minute or two)")
    parser.add_argument("--keep", metavar="DIR", help="copy both runs' logs to DIR/shell and DIR/grid")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shell, grid = copy_repo(os.path.join(tmp, "shell")), copy_repo(os.path.join(tmp, "grid"))
        env, grid_file = dict(os.environ), "grids/digits.json"
        if args.tiny:
            shim = os.path.join(tmp, "shim")
            os.makedirs(shim)
            cases = "\n".join(f'    {script}) extra="{flags}" ;;' for script, flags in TINY_FLAGS.items())
            with open(os.path.join(shim, "python"), "w") as f:
                f.write(SHIM.format(cases=cases, python=sys.executable))
            os.chmod(os.path.join(shim, "python"), stat.S_IRWXU)
            env["PATH"] = shim + os.pathsep + env["PATH"]
            with open(os.path.join(REPO, grid_file)) as f:
                tiny = {**json.load(f), **TINY_GRID}
            grid_file = os.path.join(tmp, "tiny.json")
            with open(grid_file, "w") as f:
                json.dump(tiny, f)
        print(f"running bash run_shell.sh digits{' (tiny)' if args.tiny else ''} ...", flush=True)
        shell_s = timed(["bash", "run_shell.sh", "digits"], shell, env)
        print(f"running python grid.py {'tiny' if args.tiny else grid_file} --jobs 2 ...", flush=True)
        grid_s = timed([sys.executable, "grid.py", grid_file, "--jobs", "2", "--no_summary"], grid, env)
        shell_logs, grid_logs = log_numbers(shell), log_numbers(grid)
        if args.keep:
            for name, copy in (("shell", shell), ("grid", grid)):
                shutil.copytree(os.path.join(copy, "log"), os.path.join(args.keep, name), dirs_exist_ok=True)
    print(f"bash run_shell.sh digits:                  {shell_s:7.1f} s")
    print(f"python grid.py grids/digits.json --jobs 2: {grid_s:7.1f} s")
    print(f"speed-up: {shell_s / grid_s:.2f}x on {len(os.sched_getaffinity(0))} cores")
    if shell_logs != grid_logs:
        differ = [name for name in set(shell_logs) | set(grid_logs) if shell_logs.get(name) != grid_logs.get(name)]
        sys.exit(
            f"error: the logs differ beyond the defend-time lines ({', '.join(sorted(differ))}); run_shell.sh's "
            f"steps used torch's default threads and grid.py's OMP_NUM_THREADS=1: rerun with OMP_NUM_THREADS=1 "
            f"to compare at equal threads"
        )
    print(f"logs: the same numbers in all {len(grid_logs)} files ({', '.join(grid_logs)}), defend-time lines aside")


if __name__ == "__main__":
    main()
