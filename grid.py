"""Run a grid of experiments as a DAG of the scripts' own commands, locally or on Slurm, with resume.

python grid.py GRID.json [--backend local|slurm] [--gpus 0,1,...] [--jobs_per_gpu N] [--jobs N] [--retries N]
                         [--dry_run] [--force] [--only PATTERN ...] [--no_summary]
                         [--partition P] [--time MINUTES] [--gpus_per_job N] [--cpus_per_job N] [--mem_gb N]
                         [--slurm_extra k=v,...] [--no_wait]

The grid file (JSON; grids/ holds the release's digits runs and the paper's grids). Keys:
  configs      list of config paths relative to the repo, e.g. ["config/digits.json"]          (required)
  pruners      one pruner for every config, or {config: pruner}                                 (required)
  sparsities   list, e.g. [0.5, 0.6, 0.7]                                                      (required)
  defenses     list of entries {"defend": name, settings..., "per_config": {config: {settings}}} (required)
  prune_iter 5, seeds [7], shadow_num 5, attacks "threshold,samia", semantics "release",
  original false (true: also attack the unpruned models, --original, once per config and seed),
  control false (true: also Base at sparsity 0 with the same schedule, the fine-tuning control),
  adaptive true (false: attack the defenses with Base-pruned shadows; needs a "base" entry),
  overrides {"pretrain": {flag: value}, "prune": {...}, "attack": {...}}: flags added to every command
      of that kind (true: the bare flag, false: left out), e.g. {"pretrain": {"epochs": 2}};
      "audit": flags of every audit step,
  audit {models, group_size, canaries | audit_top_memscore, with_dp, bootstrap, rmia_gamma, prune_epochs,
      early_stop, early_stop_pretrain, audit_tag, dp: {noise, tuning_models, tolerance, refine, target_acc},
      control, tune: {trials, tuning_models}}: an audit grid, whose steps are audit.py's (docs/audit.md,
      docs/grid.md; one sparsity); a defense entry {"defend": name, "tuned": true} there is tuned first.
A defense entry's settings: stride and width (window defenses: required), mem_thre (ml2, slide_ml2,
slide_re_ml2: required), weight_decay_mem (those three: optional), defend_arg (the baselines: required).
stride, width and mem_thre may be "auto" (derived from the data: docs/defenses.md; the steps' names get _auto).
Each is a value or a list (every combination is one setting); "per_config" replaces settings for one
config; "defend": "base" takes none. A bad grid is one `error:` line (exit 2) before anything runs; so
is a mem-score file missing for a step selected to run (after --only and resume; exit 1), with the --only
patterns that run the other steps; --dry_run turns it into a `# warning:` line.

Steps, named <ds>_<model>[_seed<k>]/pretrain, .../prune.<result prefix>, .../attack.<result prefix>:
`python pretrain_modi.py GPU-ID CONFIG ...` per config and seed, then (original: true) its unpruned attack,
then per sparsity and setting `python prune_modi.py ...` and `python mia_modi.py ... --adaptive`, each with
--quiet, from the repo root.
Settings of one grid that would share a name (same config, seed, pruner, sparsity, defense and, for the
baselines, defend_arg) each get --tag spelling what varies between them: s<stride>w<width>, t<mem_thre>,
wd<weight_decay_mem>, joined by '-' (e.g. s2w10-t0.3); a lone setting gets none, so the release's commands
keep the release's names. Steps that append to one log file run one after the other, in grid order.
A config written two ways (config/digits.json, ./config/digits.json, its absolute path), a sparsity or a
setting given twice each run once; two steps that would still share a name (two config files of one
dataset and model) are refused.

Resume: a step that exits 0 writes result/<ds>_<model>/jobs/<kind>.<prefix>.json (command, its sha256
with the GPU-ID left out so that a CPU run resumes on GPUs, exit status, start/end, host, seconds,
CUDA_VISIBLE_DEVICES); a step removes its record when it starts. A rerun skips the steps whose record
matches and whose dependencies are not rerun; --force reruns them. --only PATTERN (a shell pattern,
fnmatch, over a step's whole name or command, e.g. '*slide_re*'; repeated: any of them) keeps the
matching steps and what they need. Output: log/grid/<step name>.out and .err. Exit 1 or 2 of a step (the
scripts' refusals) is final, other failures are retried --retries times; then its dependents are skipped, the rest
of the grid still runs, and grid.py exits 1.

local: --jobs_per_gpu N steps (default 1) on each --gpus GPU (CUDA_VISIBLE_DEVICES=<it>, GPU-ID 0) or --jobs N
CPU steps (GPU-ID -1), each with OMP_NUM_THREADS = cores // steps at once. A killed driver takes its running
steps with it (SIGTERM). Each finished step prints a line: done/total, the counts, elapsed time, an ETA (and on
Slurm the jobs squeue shows pending).
slurm: one job per step via submitit (its files in log/grid_slurm/<job id>/), afterok on the steps it
needs (kill-on-invalid-dep: a job whose dependency failed is cancelled) and afterany on the one before
it in its log file; the job itself runs the command and writes the record. The driver polls squeue and
the records; --no_wait returns after submitting. A rerun adopts this grid's jobs still queued; an
interrupted driver leaves its jobs running and lists their ids.
At the end: `python summarize.py log --markdown --plot` (results.csv, log/grid/results.md, tradeoff.png).
"""

import argparse
import os
import subprocess
import sys

from common import MissingError, Terminated, UsageError, atomic_write, main_guard
from gridrun.local import run_local
from gridrun.plan import check_commands, dry_run, expand, missing_memscores, plan
from gridrun.slurm import require_slurm, slurm_gpus, squeue, submit_slurm, wait_slurm
from gridrun.spec import Grid
from gridrun.step import REPO, last_line
from paths import LOG_ROOT


def report(path, tracker, done):
    counts = tracker.counts
    print(
        f"{path}: {sum(counts.values())} steps to run: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['skipped']} skipped" + (f"; {len(done)} done before were not rerun" if done else ""),
        file=sys.stderr,
    )
    for step, why in tracker.failed:
        print(
            f"  failed: {step.name}: {why}\n          output: {step.output('out')}, {step.output('err')}",
            file=sys.stderr,
        )
    if tracker.skipped:
        print("  skipped, as a step they need failed: " + ", ".join(tracker.skipped), file=sys.stderr)


def summarize(ran_now: int, ran_before: int):
    """python summarize.py log --markdown --plot, its table also kept in log/grid/results.md, and the files it
    left out (its `skipped <file>: <why>` lines) passed on. A failing summarize.py is this command's error
    (exit 1); the table it had written before stays as it was."""
    table = os.path.join(LOG_ROOT, "grid", "results.md")
    args = [LOG_ROOT, "--markdown", "--plot"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "summarize.py"), *args], capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("skipped "):
            print(line, file=sys.stderr)
    if proc.returncode != 0:
        why = last_line(proc.stderr).removeprefix("error: ") or f"exit status {proc.returncode}"
        raise MissingError(
            f"summarize.py failed after the steps ({ran_now} ran now, {ran_before} before): {why}; "
            f"once fixed, run python summarize.py {' '.join(args)}"
        )
    atomic_write(table, lambda f: f.write(proc.stdout.encode(errors="surrogateescape")))
    print(f"results: table in results.csv and {table} (Markdown), plot in tradeoff.png", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like the scripts
        raise UsageError(f"{message}; see 'python grid.py --help'")


def get_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", metavar="GRID.json")
    parser.add_argument("--backend", choices=("local", "slurm"), default="local")
    parser.add_argument("--gpus", default="", help="local: comma list of GPU indices, one step per GPU at a time")
    parser.add_argument("--jobs", type=int, default=None, help="local without --gpus: CPU steps at a time (1)")
    parser.add_argument(
        "--jobs_per_gpu",
        type=int,
        default=None,
        metavar="N",
        help="local with --gpus: steps at a time on each GPU (1); docs/grid.md: choosing N",
    )
    parser.add_argument("--retries", type=int, default=1, help="reruns of a step that failed other than by exit 1/2")
    parser.add_argument("--dry_run", action="store_true", help="print the steps to run as a bash script, run nothing")
    parser.add_argument("--force", action="store_true", help="rerun steps (those --only matches) even when done")
    parser.add_argument(
        "--only",
        metavar="PATTERN",
        action="append",
        help="shell pattern over step names or commands; repeat it to keep steps matching any",
    )
    parser.add_argument("--no_summary", action="store_true", help="skip summarize.py at the end")
    slurm = parser.add_argument_group("--backend slurm")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", type=int, metavar="MINUTES", help="per job (default: the partition's)")
    slurm.add_argument("--gpus_per_job", type=int, help="default 1 when the partition has GPUs, else 0 (GPU-ID -1)")
    slurm.add_argument("--cpus_per_job", type=int, help="default 1; also each step's OMP_NUM_THREADS")
    slurm.add_argument("--mem_gb", type=int)
    slurm.add_argument("--slurm_extra", metavar="k=v,...", help="more sbatch parameters, e.g. account=abc,qos=high")
    slurm.add_argument("--no_wait", action="store_true", help="exit once the jobs are submitted")
    args = parser.parse_args(argv)
    slurm_only = [
        f"--{name}"
        for name in ("partition", "time", "gpus_per_job", "cpus_per_job", "mem_gb", "slurm_extra", "no_wait")
        if getattr(args, name) not in (None, False)
    ]
    if args.backend == "local" and slurm_only:
        raise UsageError(f"{', '.join(slurm_only)}: for --backend slurm only; add --backend slurm or drop them")
    if args.backend == "slurm" and (args.gpus or args.jobs is not None or args.jobs_per_gpu is not None):
        raise UsageError("--gpus, --jobs and --jobs_per_gpu are --backend local options; Slurm places the jobs")
    if args.gpus and args.jobs is not None:
        raise UsageError("pass --gpus (steps on GPUs) or --jobs (CPU steps), not both")
    if args.jobs_per_gpu is not None and not args.gpus:
        raise UsageError("--jobs_per_gpu needs --gpus (the GPUs to share); for CPU steps use --jobs")
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not all(g.isdigit() for g in args.gpus):
        raise UsageError(f"--gpus takes GPU indices like 0,1, got {','.join(args.gpus)}")
    args.jobs = 1 if args.jobs is None else args.jobs
    args.jobs_per_gpu = 1 if args.jobs_per_gpu is None else args.jobs_per_gpu
    args.cpus_per_job = 1 if args.cpus_per_job is None else args.cpus_per_job
    for name in ("jobs", "jobs_per_gpu", "cpus_per_job"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.retries < 0 or (args.gpus_per_job or 0) < 0:
        raise UsageError("--retries and --gpus_per_job must be >= 0")
    if args.slurm_extra and not all("=" in item for item in args.slurm_extra.split(",") if item):
        raise UsageError(f"--slurm_extra takes k=v,k=v, got {args.slurm_extra!r}")
    return args


def main():
    args = get_args()
    path = args.grid
    args.grid = os.path.abspath(args.grid)
    os.chdir(REPO)  # grids name config/ relative to the repo, and the scripts write result/, log/ there
    grid = Grid(args.grid, path)
    steps = expand(grid)
    check_commands(grid, steps)
    todo, done = plan(steps, args.only, args.force)
    warnings = missing_memscores(grid, todo)
    if warnings and not args.dry_run:
        raise MissingError(warnings[0])
    gpus = (
        (slurm_gpus(args.partition) if args.gpus_per_job is None else args.gpus_per_job)
        if args.backend == "slurm"
        else len(args.gpus)
    )
    if args.dry_run:
        cuda = args.gpus[0] if args.gpus else None
        return dry_run(path, todo, done, "0" if gpus else "-1", cuda, warnings)
    if args.backend == "local":
        tracker = run_local(todo, done, args.gpus, args.jobs, args.retries, args.jobs_per_gpu)
    else:
        require_slurm("sinfo", "sbatch", "squeue")
        ids = submit_slurm(todo, args, gpus)
        if args.no_wait:
            print(
                "not waiting (--no_wait): follow them with squeue --me; rerun this command "
                "to wait for them and summarize (it adopts the queued jobs)",
                file=sys.stderr,
            )
            return
        try:
            tracker = wait_slurm(todo, done, ids)
        except (KeyboardInterrupt, Terminated) as err:
            name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
            queued = {job for job in ids.values()}
            active = squeue("-o", "%i")
            left = sorted(queued & set(active) if active is not None else queued, key=lambda j: (len(j), j))
            print(
                f"error: interrupted ({name}); {len(left)} jobs are still queued or running on Slurm; rerun this "
                f"command to follow them, or scancel {' '.join(left)}",
                file=sys.stderr,
            )
            sys.exit(code)
    report(path, tracker, done)
    if not args.no_summary and not grid.audit and (tracker.counts["done"] or done):  # the audit summarizes itself
        summarize(tracker.counts["done"], len(done))
    if tracker.failed or tracker.skipped:
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
