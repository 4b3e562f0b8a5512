"""End to end: wall time of the digits audit (docs/audit.md) from its one command, `python audit.py all`, with
M = 32 models: Base, slide_re, ml2 and slide_ml2 (the settings of grids/digits.json) and the utility-matched
DP-SGD baseline (dp tuned as every defense, by audit.py tune), then the time of each step (from the command's own
`== audit step ... done in` lines). It runs in a temporary folder, so your result/ and log/ stay untouched, and
prints the audit table at the end.

python bench/bench_audit.py [--models 32] [--threads 1] [--keep DIR] [-- extra audit.py all flags]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from common_bench import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_AUDIT = [
    "--pruner_name",
    "iter_prunetxt",
    "--prune_sparsity",
    "0.6",
    "--prune_iter",
    "5",
    "--defense",
    "base",
    "--defense",
    "slide_re:stride=1,width=5",
    "--defense",
    "ml2:weight_decay_mem=0.1,mem_thre=0.3",
    "--defense",
    "slide_ml2:weight_decay_mem=0.1,stride=1,width=5,mem_thre=0.3",
    "--with_dp",
    "--quiet",
    "--no_tensorboard",
]
DONE = re.compile(r"^== audit step (\S+) done in ([0-9.]+)s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="more flags for audit.py all (after --)")
    args = parser.parse_args()
    workdir = args.keep or tempfile.mkdtemp(prefix="bench_audit_")
    os.makedirs(workdir, exist_ok=True)
    command = [sys.executable, os.path.join(REPO, "audit.py"), "all", "-1", os.path.join(REPO, "config", "digits.json")]
    command += ["--models", str(args.models), *DIGITS_AUDIT, *args.extra]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES=""
    )
    print("$ " + " ".join(command[1:]), flush=True)
    start, cpu = time.perf_counter(), os.times()
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    used = os.times()
    cpu_s = (used.children_user - cpu.children_user) + (used.children_system - cpu.children_system)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        sys.exit(proc.returncode)
    steps = [(m.group(1), float(m.group(2))) for m in map(DONE.match, proc.stdout.splitlines()) if m]
    kinds = {}
    for name, seconds in steps:
        kind = name.split(".")[0] if not name.startswith(("prune.", "attack.")) else ".".join(name.split(".")[:2])
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    table("Seconds per step kind", ["step", "seconds"], [[k, f"{v:.1f}"] for k, v in kinds.items()])
    table("Seconds per step", ["step", "seconds"], [[n, f"{s:.1f}"] for n, s in steps])
    print(f"\nTotal wall time {total:.1f}s ({total / 60:.2f} min), CPU time {cpu_s:.1f}s, {os.cpu_count()} cores")
    print(
        "\n" + "\n".join(line for line in proc.stdout.splitlines() if line.startswith("|") or "models; audited" in line)
    )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
