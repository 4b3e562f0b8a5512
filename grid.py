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
  adaptive true (false: attack the defenses with Base-pruned shadows; needs a "base" entry),
  overrides {"pretrain": {flag: value}, "prune": {...}, "attack": {...}}: flags added to every command
      of that kind (true: the bare flag, false: left out), e.g. {"pretrain": {"epochs": 2}}.
A defense entry's settings: stride and width (window defenses: required), mem_thre (ml2, slide_ml2,
slide_re_ml2: required), weight_decay_mem (those three: optional), defend_arg (the baselines: required).
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
import ctypes
import datetime
import fnmatch
import functools
import hashlib
import importlib
import itertools
import json
import os
import pwd
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

from common import MissingError, Terminated, UsageError, load_config, main_guard
from paths import DEFAULT_SEED, LOG_ROOT, RESULT_ROOT, log_dir, log_path, memscore_path, run_name, tagged

REPO = os.path.dirname(os.path.abspath(__file__))
GPU = "GPU-ID"  # stands for the GPU-ID in a step's argv until it runs
SCRIPTS = {"pretrain": "pretrain_modi.py", "prune": "prune_modi.py", "attack": "mia_modi.py"}
GRID_KEYS = {
    "configs": list,
    "pruners": (str, dict),
    "sparsities": list,
    "defenses": list,
    "prune_iter": int,
    "seeds": list,
    "shadow_num": int,
    "attacks": str,
    "semantics": str,
    "original": bool,
    "adaptive": bool,
    "overrides": dict,
}
DEFAULTS = {
    "prune_iter": 5,
    "seeds": [DEFAULT_SEED],
    "shadow_num": 5,
    "attacks": "threshold,samia",
    "semantics": "release",
    "original": False,
    "adaptive": True,
    "overrides": {},
}
SETTINGS = {"stride": int, "width": int, "mem_thre": float, "weight_decay_mem": float, "defend_arg": float}
EXAMPLES = {"stride": 1, "width": 15, "mem_thre": 0.6, "defend_arg": 4}
TAG_LETTERS = {"stride": "s", "width": "w", "mem_thre": "t", "weight_decay_mem": "wd"}
RESERVED = {
    "seed",
    "shadow_num",
    "quiet",
    "help",
    "pruner_name",
    "prune_sparsity",
    "prune_iter",
    "attacks",
    "defend",
    "adaptive",
    "original",
    "semantics",
    "tag",
    *SETTINGS,
}  # grid.py sets these itself
FINAL_EXITS = (1, 2)  # the scripts' refusals (usage, missing prerequisite): a retry would be refused again
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}  # squeue states of a job that has not ended
POLL_S = 3.0


# ---------------------------------------------------------------- steps (also run inside Slurm jobs)


@dataclass
class Step:
    name: str  # <run>/pretrain, <run>/prune.<prefix>, <run>/attack.<prefix>, <run>/attack.original
    kind: str  # pretrain | prune | attack
    argv: list  # after "python"; GPU stands for the GPU-ID
    log: str  # the log file it appends to
    needs: list = field(default_factory=list)  # steps whose outputs it reads
    after: list = field(default_factory=list)  # the step before it in its log file
    memscores: str = None  # the mem-score CSV it reads (prune under a mem-score defense)
    origin: str = ""  # the grid entries it comes from, for error messages

    def command(self, gpu=GPU):
        return shlex.join(["python"] + [gpu if a == GPU else a for a in self.argv])

    @property
    def sha256(self):
        """Of the command with the GPU-ID left as 'GPU-ID': the device is not part of what a step computes."""
        return hashlib.sha256(self.command().encode()).hexdigest()

    @property
    def record(self):
        run, rest = self.name.split("/", 1)
        return os.path.join(RESULT_ROOT, run, "jobs", rest + ".json")

    def output(self, ext):
        return os.path.join(LOG_ROOT, "grid", f"{self.name}.{ext}")


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def last_line_of(path):
    try:
        with open(path, errors="replace") as f:
            return last_line(f.read())
    except OSError:
        return ""


def read_record(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_record(path, record):
    # Not common.atomic_write: importing common loads torch, seconds per Slurm job for a 1 kB file.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def die_with_parent(prctl, parent):
    """In a step's child before exec: SIGTERM once the thread that started it ends (PR_SET_PDEATHSIG = 1),
    so a killed driver leaves no step running. prctl was looked up before the fork: other threads may
    hold the import or loader locks."""
    if prctl is not None:
        prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def run_step(step, gpu, env, retries):
    """Run step's command (1 + retries attempts; exit 1 or 2 is final), output to its .out/.err. On exit 0
    write its record and return (0, record); else (last exit status, None)."""
    for path in (step.output("out"), step.record):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(step.record):  # the outputs are about to change (a rerun, or another grid's setting)
        os.remove(step.record)
    argv = [sys.executable] + [gpu if a == GPU else a for a in step.argv]
    prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
    code = None
    for attempt in range(1 + retries):
        start, mode = time.time(), "w" if attempt == 0 else "a"
        with open(step.output("out"), mode) as out, open(step.output("err"), mode) as err:
            if attempt:
                err.write(f"=== grid.py: attempt {attempt + 1}; the last one ended with {code}\n")
                err.flush()
            code = subprocess.run(
                argv,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, prctl, os.getpid()),
            ).returncode
        if code == 0:
            end = time.time()
            iso = lambda t: datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
            record = {
                "step": step.name,
                "command": step.command(gpu),
                "sha256": step.sha256,
                "exit_status": 0,
                "start": iso(start),
                "end": iso(end),
                "seconds": round(end - start, 3),
                "host": socket.gethostname(),
                "attempt": attempt + 1,
                "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                "slurm_job_id": env.get("SLURM_JOB_ID"),
            }
            write_record(step.record, record)
            return 0, record
        if code in FINAL_EXITS:
            break
    return code, None


def slurm_job(repo, step, gpu, retries):
    """The body of a step's Slurm job. grid.py runs as __main__, so cloudpickle sends this by value: the
    node needs the repo only for the command itself."""
    if not os.path.isdir(repo):
        raise RuntimeError(
            f"error: the repo {repo} does not exist on {socket.gethostname()}; grid.py's jobs run "
            f"in it, so it must be on a filesystem shared with the compute nodes"
        )
    os.chdir(repo)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    code, record = run_step(step, gpu, env, retries)
    if code != 0:
        raise RuntimeError(f"{step.name} ended with {code}: {last_line_of(step.output('err'))}")
    return record


# ---------------------------------------------------------------- the grid file


def is_a(value, want):
    """JSON types: a bool is not a number, an int is a float."""
    if want in (int, float):
        return isinstance(value, (int, float) if want is float else int) and not isinstance(value, bool)
    return isinstance(value, want)


def setting_keys(cls):
    """(required, optional) settings of a defense class."""
    from defenses import RiskMemory

    required = ({"stride", "width"} if cls.window else set()) | ({"defend_arg"} if cls.arg_in_name else set())
    return (required | {"mem_thre"}, {"weight_decay_mem"}) if issubclass(cls, RiskMemory) else (required, set())


def filled(cls, setting):
    """A setting with the scripts' defaults for its optional keys, as floats (to compare settings)."""
    from defenses import DefenseSettings

    defaults = {key: getattr(DefenseSettings(), key) for key in setting_keys(cls)[1]}
    return {key: float(value) for key, value in {**defaults, **setting}.items()}


class Grid:
    """A validated grid file: its keys, defaults filled in, and settings[config] = [(entry, class, setting)]."""

    def __init__(self, path, shown):
        self.path = shown
        try:
            with open(path) as f:
                data = json.load(f)
        except IsADirectoryError:
            raise UsageError(f"grid file {shown} is a folder; pass a JSON grid file, e.g. grids/digits.json")
        except OSError as err:
            raise UsageError(
                f"grid file {shown} {'not found' if isinstance(err, FileNotFoundError) else 'unreadable'}"
                f" ({err.strerror}); pass a JSON grid such as grids/digits.json"
            )
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"grid {shown} is not valid JSON ({err}); fix the file")
        self.check(isinstance(data, dict), "top level", "must be a JSON object (see grids/digits.json)")
        for key in data:
            self.check(key in GRID_KEYS, f"unknown key '{key}'", f"valid keys are {', '.join(GRID_KEYS)}")
        for key in ("configs", "pruners", "sparsities", "defenses"):
            self.check(key in data, f"key '{key}'", "missing (it has no default)")
        self.keys = {**DEFAULTS, **data}
        for key, want in GRID_KEYS.items():
            kind = "a non-empty list" if want is list else getattr(want, "__name__", "a string or an object")
            self.check(
                is_a(self.keys[key], want) and (self.keys[key] or want is not list),
                f"key '{key}'",
                f"must be {kind}, got {self.keys[key]!r}",
            )
        self.check_configs()
        self.check_values()
        self.settings = {config: [] for config in self.configs}
        for i, entry in enumerate(self.keys["defenses"]):
            self.add_entry(i, entry)
        self.check(
            self.keys["adaptive"] or any(c.name == "base" for _, c, _ in self.settings[self.configs[0]]),
            "key 'adaptive'",
            'false attacks the defenses with Base-pruned shadows: add {"defend": "base"}',
        )

    def check(self, ok, where, what):
        if not ok:
            raise UsageError(f"grid {self.path}: {where}: {what}")

    def __getitem__(self, key):
        return self.keys[key]

    def check_configs(self):
        """Configs as one spelling each (config_name): one file written two ways is one config."""
        from pruning import PRUNERS

        self.configs, self.loaded, written = [], {}, {}
        for config in self.keys["configs"]:
            self.check(isinstance(config, str), "configs", f"{config!r} is not a path")
            name = config_name(config)
            if name in written:
                continue  # the same file again, e.g. ./config/digits.json after config/digits.json
            written[name] = config
            try:
                self.loaded[name] = load_config(name)
            except UsageError as err:
                self.check(False, "configs", f"{err} (paths are relative to the repo)")
            self.configs.append(name)
        pruners = self.keys["pruners"]
        if isinstance(pruners, dict):
            self.check(all(isinstance(v, str) for v in pruners.values()), "pruners", "each pruner must be a string")
            named = {}
            for config, pruner in pruners.items():
                name = config_name(config)
                self.check(
                    named.get(name, pruner) == pruner,
                    "pruners",
                    f"'{config}' and '{written.get(name, name)}' are one config with two pruners; keep one",
                )
                named[name] = pruner
            pruners = named
        self.pruners = dict.fromkeys(self.configs, pruners) if isinstance(pruners, str) else pruners
        for config in set(self.pruners) ^ set(self.configs):
            self.check(
                False,
                "pruners",
                f"'{config}' is {'not in configs' if config in self.pruners else 'missing'}"
                f"; give one pruner per config, or one string for all",
            )
        for config, pruner in self.pruners.items():
            self.check(
                pruner in PRUNERS, f"pruners ({config})", f"unknown pruner {pruner!r}; valid: {', '.join(PRUNERS)}"
            )

    def check_values(self):
        from attacks import parse_attacks
        from defenses import SEMANTICS
        from pruning import check_pruning_flags

        for sparsity in self.keys["sparsities"]:
            self.check(is_a(sparsity, float), "sparsities", f"{sparsity!r} is not a number")
            self.refused(lambda: check_pruning_flags(self.pruners[self.configs[0]], sparsity), "sparsities")  # noqa: B023
        self.sparsities = list(dict.fromkeys(float(s) for s in self.keys["sparsities"]))  # 0.6 twice is one run
        seeds = self.keys["seeds"]
        self.check(
            all(is_a(s, int) for s in seeds) and len(set(seeds)) == len(seeds),
            "seeds",
            f"must be distinct integers, got {seeds!r}",
        )
        self.refused(lambda: parse_attacks(self.keys["attacks"]), "attacks")
        self.check(self.keys["semantics"] in SEMANTICS, "semantics", f"must be one of {', '.join(SEMANTICS)}")
        for kind, flags in self.keys["overrides"].items():
            self.check(
                kind in SCRIPTS and isinstance(flags, dict),
                "overrides",
                f"'{kind}' must be one of {', '.join(SCRIPTS)}, each {{flag: value}}, e.g. "
                f'{{"pretrain": {{"epochs": 2}}}}',
            )
            for flag, value in flags.items():
                self.check(
                    flag not in RESERVED, f"overrides.{kind}", f"--{flag} is set by grid.py from the grid's own keys"
                )
                self.check(
                    isinstance(value, (str, int, float, bool)),
                    f"overrides.{kind}",
                    f"--{flag} must be a string, a number or true/false",
                )

    def refused(self, call, where):
        """call(); a UsageError it raises becomes one naming `where` in this grid."""
        try:
            call()
        except UsageError as err:
            self.check(False, where, str(err))

    def add_entry(self, i, entry):
        from defenses import DEFENSES, DefenseSettings

        self.check(
            isinstance(entry, dict) and isinstance(entry.get("defend"), str),
            f"defenses[{i}]",
            'must be an object with "defend": name, e.g. {"defend": "base"}',
        )
        cls = DEFENSES.get(entry["defend"])
        self.check(cls, f"defenses[{i}]", f"unknown defense {entry['defend']!r}; valid: {', '.join(DEFENSES)}")
        where, (required, optional) = f"defenses[{i}] ({cls.name})", setting_keys(cls)
        allowed, per_config = required | optional, entry.get("per_config", {})
        for key in set(entry) - {"defend", "per_config"}:
            self.check(
                key in allowed,
                where,
                f"{cls.name} takes no '{key}'; it takes {', '.join(sorted(allowed)) or 'no setting'}",
            )
        self.check(
            isinstance(per_config, dict)
            and all(
                isinstance(c, str) and config_name(c) in self.configs and isinstance(v, dict) and set(v) <= allowed
                for c, v in per_config.items()
            ),
            where,
            f"per_config must map configs of the grid to {{setting: value}} with settings in "
            f"{', '.join(sorted(allowed)) or 'nothing'}",
        )
        per_config = {config_name(c): v for c, v in per_config.items()}
        for config in self.configs:
            values = {**{k: entry[k] for k in allowed if k in entry}, **per_config.get(config, {})}
            missing = required - set(values)
            example = ", ".join(f'"{key}": {EXAMPLES[key]}' for key in sorted(missing))
            self.check(
                not missing,
                where,
                f"needs {' and '.join(sorted(missing))}"
                + (f" for {config}" if per_config else "")
                + f"; add them, e.g. {example}",
            )
            choices = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
            for key, options in choices.items():
                self.check(
                    options and all(is_a(v, SETTINGS[key]) for v in options),
                    where,
                    f"{key} must be {SETTINGS[key].__name__} or a non-empty list of them, got {values[key]!r}",
                )
            for combo in itertools.product(*choices.values()):
                setting = dict(zip(choices, combo))
                settings = DefenseSettings(**setting, semantics=self.keys["semantics"])
                self.refused(lambda: cls.check_args(settings), where)  # e.g. stride 0, a negative ppb weight  # noqa: B023
                if not any(
                    other_cls is cls and filled(cls, other) == filled(cls, setting)
                    for _, other_cls, other in self.settings[config]
                ):  # a repeated setting is one run
                    self.settings[config].append((i, cls, setting))

    def tags(self, config):
        """The --tag of each setting of config: '' unless another setting shares its name (defense and, for
        the baselines, defend_arg); then what varies within that group, e.g. s1w15 or s2w10-t0.3."""
        settings, tags, groups = self.settings[config], [""] * len(self.settings[config]), {}
        for n, (_, cls, setting) in enumerate(settings):
            groups.setdefault((cls.name, setting.get("defend_arg")), []).append(n)
        for members in (m for m in groups.values() if len(m) > 1):
            full = {n: filled(settings[n][1], settings[n][2]) for n in members}
            vary = [key for key in TAG_LETTERS if len({full[n].get(key) for n in members}) > 1]
            for n in members:
                value = {**full[n], **settings[n][2]}  # as the grid writes it: 15, not 15.0
                spell = lambda keys: "".join(f"{TAG_LETTERS[k]}{value[k]}" for k in keys if k in vary)  # noqa: B023
                tags[n] = "-".join(
                    p for p in (spell(("stride", "width")), spell(("mem_thre",)), spell(("weight_decay_mem",))) if p
                )
        return tags


def config_name(config):
    """A config path as one spelling: resolved (., .., links), relative to the repo when inside it."""
    path = os.path.realpath(os.path.join(REPO, config))
    inside = os.path.commonpath([path, os.path.realpath(REPO)]) == os.path.realpath(REPO)
    return os.path.relpath(path, os.path.realpath(REPO)) if inside else path


# ---------------------------------------------------------------- grid -> steps


def flags_of(overrides):
    """{flag: value} -> ['--flag', 'value', ...]; true is the bare flag, false leaves it out."""
    argv = []
    for flag, value in overrides.items():
        if value is not False:
            argv += [f"--{flag}"] + ([] if value is True else [str(value)])
    return argv


def expand(grid):
    """Every step of the grid, in an order that respects its dependencies; each config's unpruned attack
    (original) comes right after its pretraining, so that the reference arrives first."""
    steps = []
    over = {kind: flags_of(grid["overrides"].get(kind, {})) for kind in SCRIPTS}
    semantics = ["--semantics", grid["semantics"]] if grid["semantics"] != "release" else []
    attacks, shadows = ["--attacks", grid["attacks"]], ["--shadow_num", str(grid["shadow_num"])]
    for config in grid.configs:
        cfg, pruner, tags = grid.loaded[config], grid.pruners[config], grid.tags(config)
        scores = memscore_path(cfg["dataset_name"], cfg["model_name"])
        if not grid["adaptive"] and any(tags):
            grid.check(
                False,
                "key 'adaptive'",
                "false cannot attack tagged settings: mia_modi.py would look for Base "
                "shadows under the tag; give one setting per defense",
            )
        for seed in grid["seeds"]:
            ns = SimpleNamespace(dataset_name=cfg["dataset_name"], model_name=cfg["model_name"], seed=seed)
            run = run_name(ns)
            seeded = ["--seed", str(seed)] if seed != DEFAULT_SEED else []
            pretrain = Step(
                f"{run}/pretrain",
                "pretrain",
                [SCRIPTS["pretrain"], GPU, config, *shadows, *seeded, *over["pretrain"], "--quiet"],
                os.path.join(log_dir(ns), "pretrain.txt"),
                origin=f"config {config}, seed {seed}",
            )
            steps.append(pretrain)
            if grid["original"]:
                first = ["--pruner_name", pruner, "--prune_sparsity", str(grid.sparsities[0])]
                log = log_path(
                    SimpleNamespace(
                        **vars(ns), pruner_name=pruner, prune_sparsity=grid.sparsities[0], defend="", tag=""
                    )
                )
                steps.append(
                    Step(
                        f"{run}/attack.original",
                        "attack",
                        [
                            SCRIPTS["attack"],
                            GPU,
                            config,
                            *first,
                            *attacks,
                            *shadows,
                            "--original",
                            *semantics,
                            *seeded,
                            *over["attack"],
                            "--quiet",
                        ],
                        log,
                        needs=[pretrain.name],
                        origin=f"config {config}, seed {seed}, original",
                    )
                )
            for sparsity in grid.sparsities:
                where = ["--pruner_name", pruner, "--prune_sparsity", str(sparsity)]
                base_prune, defended = None, []
                for (i, cls, setting), tag in zip(grid.settings[config], tags):
                    origin = f"config {config}, seed {seed}, sparsity {sparsity}, defenses[{i}]" + (
                        f" {setting}" if setting else ""
                    )
                    prefix = tagged(cls.prefix(pruner, sparsity, setting.get("defend_arg"), grid["semantics"]), tag)
                    log = log_path(
                        SimpleNamespace(
                            **vars(ns), pruner_name=pruner, prune_sparsity=sparsity, defend=cls.name, tag=tag
                        )
                    )
                    named = ["--tag", tag] if tag else []
                    defend = ["--defend", cls.name] if cls.name != "base" else []
                    prune = Step(
                        f"{run}/prune.{prefix}",
                        "prune",
                        [
                            SCRIPTS["prune"],
                            GPU,
                            config,
                            *where,
                            "--prune_iter",
                            str(grid["prune_iter"]),
                            *defend,
                            *flags_of({k: setting[k] for k in SETTINGS if k in setting}),
                            *semantics,
                            *named,
                            *seeded,
                            *shadows,
                            *over["prune"],
                            "--quiet",
                        ],
                        log,
                        needs=[pretrain.name],
                        memscores=scores if cls.needs_memscore else None,
                        origin=origin,
                    )
                    adaptive = ["--adaptive"] if defend and grid["adaptive"] else []
                    arg = ["--defend_arg", str(setting["defend_arg"])] if cls.arg_in_name else []
                    attack = Step(
                        f"{run}/attack.{prefix}",
                        "attack",
                        [
                            SCRIPTS["attack"],
                            GPU,
                            config,
                            *where,
                            *attacks,
                            *shadows,
                            *defend,
                            *arg,
                            *adaptive,
                            *semantics,
                            *named,
                            *seeded,
                            *over["attack"],
                            "--quiet",
                        ],
                        log,
                        needs=[prune.name],
                        origin=origin,
                    )
                    steps += [prune, attack]
                    base_prune = prune.name if not defend else base_prune
                    defended += [attack] if defend and not grid["adaptive"] else []
                for attack in defended:  # non-adaptive: the attack also reads the Base-pruned shadows
                    attack.needs.append(base_prune)
    check_unique(grid, steps)
    last = {}  # log file -> the step that wrote it last, in grid order
    for step in steps:
        if last.get(step.log) and last[step.log] not in step.needs:
            step.after.append(last[step.log])
        last[step.log] = step.name
    return steps


def check_unique(grid, steps):
    """No two steps share a name, and so a record, an output file or a model folder (result/<run>/<prefix>_model):
    two config files of one dataset and model would."""
    first = {}
    for step in steps:
        other = first.setdefault(step.name, step)
        grid.check(
            other is step,
            "configs",
            f"step {step.name} comes twice, from {other.origin} and from "
            f"{step.origin}; each config file needs its own dataset and model",
        )


def check_commands(grid, steps):
    """Parse the first step of each kind of every config with its script's own get_args: unknown or
    mistyped override flags and a pruner that does not fit the model stop the grid before anything runs."""
    seen = set()
    for step in steps:
        script, config = step.argv[0], step.argv[2]
        if (script, config) in seen:
            continue
        seen.add((script, config))
        argv = ["-1" if a == GPU else a for a in step.argv[1:]]
        try:
            args = importlib.import_module(script[:-3]).get_args(argv)
        except (UsageError, SystemExit) as err:  # SystemExit: argparse's --help or --version
            message = str(err).replace(f"'{os.path.basename(sys.argv[0])} --help'", f"'python {script} --help'")
            grid.check(False, step.name, f"the command would be refused: {message}")
        for flag in grid["overrides"].get(step.kind, {}):
            if not hasattr(args, flag):  # argparse took it as an abbreviation of another flag
                grid.check(False, f"overrides.{step.kind}", f"--{flag} is not a flag of {script}; write it out in full")


def plan(steps, only=None, force=False):
    """(steps to run, names of steps already done). --only (one pattern or a list: a step matching any of
    them) keeps the matching steps and what they need;
    a step is done when its record holds its command's hash and nothing it needs reruns; --force reruns
    the matching steps."""
    by_name = {step.name: step for step in steps}
    patterns = [only] if isinstance(only, str) else only or []
    matched = {
        s.name
        for s in steps
        if not patterns or any(fnmatch.fnmatchcase(s.name, p) or fnmatch.fnmatchcase(s.command(), p) for p in patterns)
    }
    if not matched:
        shown = " ".join(f"--only {shlex.quote(p)}" for p in patterns)
        raise UsageError(f"{shown} matches no step; names look like {steps[-1].name} (see --dry_run)")
    keep, stack = set(), list(matched)
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack += by_name[name].needs
    todo, done = [], set()
    for step in steps:
        if step.name not in keep:
            continue
        record = read_record(step.record) or {}
        rerun = any(need not in done for need in step.needs) or (force and step.name in matched)
        if record.get("sha256") == step.sha256 and not rerun:
            done.add(step.name)
        else:
            todo.append(step)
    names = {step.name for step in todo}
    for step in todo:
        step.after = [name for name in step.after if name in names]
    return todo, done


def missing_memscores(grid, todo):
    """One line per mem-score CSV that a step to run needs and that is missing (what needs it, how to get
    it); the first also gives the --only patterns that run every other step to run. [] when none is missing."""
    from memscores import memscore_fix

    missing = {}  # CSV -> (config, defenses that need it)
    blocked = set()
    for step in todo:  # grid order: a step's needs come before it
        if step.memscores and not os.path.isfile(step.memscores):
            config, defense = step.argv[2], step.argv[step.argv.index("--defend") + 1]
            missing.setdefault(step.memscores, (config, []))[1].append(defense)
            blocked.add(step.name)
        elif any(need in blocked for need in step.needs):
            blocked.add(step.name)
    lines = []
    for scores, (config, defenses) in missing.items():
        how = memscore_fix(SimpleNamespace(gpu_id=-1, config_path=config, **grid.loaded[config]))
        lines.append(
            f"mem-scores {scores} not found (needed by {', '.join(dict.fromkeys(defenses))} on {config}); {how}"
        )
    rest = [step for step in todo if step.name not in blocked]
    if lines and rest:
        only = " ".join(f"--only {shlex.quote(pattern)}" for pattern in only_patterns(todo, blocked))
        others = f"other {len(rest)} steps need none: run them" if len(rest) > 1 else "other step needs none: run it"
        lines[0] += f"; the {others} first with python grid.py {grid.path} {only}"
    return lines


def only_patterns(todo, blocked):
    """--only patterns (each over step names) that match every step of todo not in blocked and none in it,
    the most general that is safe: */pretrain; *.*<rest> for a setting in every pruner and sparsity (e.g.
    *.*_random); *.<prefix> for one prefix in every config and seed; else the step's name."""
    patterns = []
    for step in todo:
        if step.name in blocked:
            continue
        rest = step.name.split("/", 1)[1]
        prefix = rest.split(".", 1)[1] if "." in rest else None
        setting = re.match(r"^.+?_\d*\.?\d+(.*)$", prefix or "")
        candidates = (
            (["*/pretrain"] if rest == "pretrain" else [])
            + (["*.*" + setting.group(1)] if setting and setting.group(1) else [])
            + (["*." + prefix] if prefix else [])
            + [step.name]
        )
        for pattern in candidates:
            if not any(
                fnmatch.fnmatchcase(other.name, pattern) or fnmatch.fnmatchcase(other.command(), pattern)
                for other in todo
                if other.name in blocked
            ):
                break
        patterns += [pattern] if pattern not in patterns else []
    return patterns


def dry_run(path, todo, done, gpu, cuda, warnings):
    """Print the steps as a bash script, in dependency order."""
    counts = Counter(step.kind for step in todo)
    kinds = ", ".join(f"{kind} {counts[kind]}" for kind in SCRIPTS)
    lines = [
        "#!/usr/bin/env bash",
        f"# {path}: {len(todo)} steps ({kinds}), in dependency order"
        + (f"; {len(done)} done before are left out (--force reruns them)" if done else ""),
        "set -euo pipefail",
        f"cd {shlex.quote(REPO)}",
    ]
    lines += [f"# warning: {warning}" for warning in warnings]
    lines += [f"export CUDA_VISIBLE_DEVICES={cuda}"] if cuda is not None else []
    for step in todo:
        lines += [f"# {step.name}", step.command(gpu)]
    print("\n".join(lines))


# ---------------------------------------------------------------- running


class Tracker:
    """Counts, a progress bar over the steps to run (on a terminal) and one status line per finished step:
    done/total, what ended, the counts, the time since the start and an ETA. The ETA is the steps left of
    each kind times the mean seconds of that kind's finished steps (of all finished steps for a kind with
    none yet), over `parallel` (the local slots; on Slurm the jobs running now)."""

    def __init__(self, todo, parallel=None, clock=time.monotonic, out=None):
        from tqdm import tqdm

        self.tqdm, self.counts, self.failed, self.skipped = tqdm, Counter(), [], []
        self.total, self.left, self.seconds = len(todo), Counter(step.kind for step in todo), {}
        self.parallel, self.clock, self.out, self.start = parallel, clock, out, clock()
        self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, disable=None, dynamic_ncols=True)
        self.show(0)

    def show(self, running):
        self.bar.set_postfix_str(
            f"done {self.counts['done']}, running {running}, failed {self.counts['failed']}, "
            f"skipped {self.counts['skipped']}"
        )

    def finish(self, step, how, why="", seconds=None, running=0, pending=None):
        """Count step as `how` (done, failed, skipped; seconds: how long a done step ran) and print its line."""
        self.counts[how] += 1
        self.left[step.kind] -= 1
        self.bar.update(1)
        if how == "failed":
            self.failed.append((step, why))
        elif how == "skipped":
            self.skipped.append(step.name)
        if how == "done" and seconds is not None:
            self.seconds.setdefault(step.kind, []).append(seconds)
        self.tqdm.write(self.status(step, how, why, running, pending), file=self.out or sys.stderr)

    def status(self, step, how, why="", running=0, pending=None):
        """e.g. [3/9] done digits_columnfc/prune.iter_prunetxt_0.6_base | 3 done, 0 failed, 0 skipped,
        2 running | elapsed 0:00:41 | ETA 0:01:30"""
        counts = (
            f"{self.counts['done']} done, {self.counts['failed']} failed, {self.counts['skipped']} skipped, "
            f"{running} running" + (f", {pending} pending (squeue)" if pending is not None else "")
        )
        return " | ".join(
            [
                f"[{sum(self.counts.values())}/{self.total}] {how} {step.name}",
                counts,
                f"elapsed {hms(self.clock() - self.start)}",
                f"ETA {self.eta(running)}",
            ]
            + ([why] if why else [])
        )

    def eta(self, running):
        left = {kind: n for kind, n in self.left.items() if n > 0}
        every = [s for seconds in self.seconds.values() for s in seconds]
        if not left:
            return "0:00:00"
        if not every:
            return "?"
        mean = lambda kind: sum(self.seconds.get(kind, every)) / len(self.seconds.get(kind, every))
        parallel = self.parallel or max(1, running)
        return hms(sum(n * mean(kind) for kind, n in left.items()) / parallel)

    def close(self):
        self.bar.close()


def hms(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))


def failure(step, code):
    what = f"killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exit {code}"
    return f"{what}: {last_line_of(step.output('err')) or '(no stderr)'}"


@dataclass(frozen=True)
class Slot:
    cuda: str | None  # CUDA_VISIBLE_DEVICES of a GPU slot; None: a CPU slot
    threads: int  # OMP_NUM_THREADS

    @property
    def gpu_id(self):
        return "-1" if self.cuda is None else "0"  # the one GPU a step sees is its cuda:0


def local_slots(gpus, jobs, jobs_per_gpu, cores):
    """One slot per step that may run at once, in the order they are handed out: jobs_per_gpu on each GPU of
    gpus, round robin (0, 1, 0, 1: the first steps spread over the GPUs), else `jobs` CPU slots; the cores
    shared evenly (at least one thread each)."""
    devices = [gpu for _ in range(jobs_per_gpu) for gpu in gpus] or [None] * jobs
    return [Slot(device, max(1, cores // len(devices))) for device in devices]


class Schedule:
    """Which step runs when, on which slot: in grid order, a step starts on the first free slot once what
    it needs is done and the step before it in its log has ended; a step whose need failed is skipped."""

    def __init__(self, todo, done, slots):
        self.state = dict.fromkeys(done, "done")
        self.free, self.waiting, self.running = list(slots), list(todo), {}

    def next(self):
        """([(step, slot) to start now], [steps skipped now]), both in grid order."""
        started, skipped = [], []
        for step in list(self.waiting):  # in grid order, so a skip reaches the dependents in the same pass
            if any(self.state.get(need) in ("failed", "skipped") for need in step.needs):
                self.state[step.name] = "skipped"
                self.waiting.remove(step)
                skipped.append(step)
            elif (
                self.free
                and all(self.state.get(need) == "done" for need in step.needs)
                and all(self.state.get(name) in ("done", "failed", "skipped") for name in step.after)
            ):
                self.waiting.remove(step)
                self.running[step.name] = self.free.pop(0)
                started.append((step, self.running[step.name]))
        return started, skipped

    def finish(self, step, ok):
        self.free.append(self.running.pop(step.name))
        self.state[step.name] = "done" if ok else "failed"


def run_local(todo, done, gpus, jobs, retries, jobs_per_gpu=1):
    """jobs_per_gpu steps at a time on each GPU (or `jobs` CPU steps), each as soon as what it needs is done."""
    slots = local_slots(gpus, jobs, jobs_per_gpu, len(os.sched_getaffinity(0)))
    schedule, finished, tracker = Schedule(todo, done, slots), queue.Queue(), Tracker(todo, parallel=len(slots))

    def work(step, slot):
        env = dict(os.environ, OMP_NUM_THREADS=str(slot.threads), CUDA_VISIBLE_DEVICES=slot.cuda or "")
        try:
            code, record = run_step(step, slot.gpu_id, env, retries)
        except Exception as err:  # e.g. a full disk while writing the output: report, don't hang the driver
            code, record = f"grid.py could not run it ({err})", None
        finished.put((step, code, record))

    def launch():
        """Start what can start; the steps skipped now. Then a status line counts the steps just started."""
        started, skipped = schedule.next()
        for step, slot in started:
            threading.Thread(target=work, args=(step, slot), daemon=True).start()
        return skipped

    try:
        skipped = launch()
        while True:
            for step in skipped:
                tracker.finish(step, "skipped", running=len(schedule.running))
            tracker.show(len(schedule.running))
            if not schedule.running:
                break
            step, code, record = finished.get()
            schedule.finish(step, code == 0)
            skipped = launch()
            tracker.finish(
                step,
                "done" if code == 0 else "failed",
                "" if code == 0 else code if isinstance(code, str) else failure(step, code),
                seconds=record and record["seconds"],
                running=len(schedule.running),
            )
    except (KeyboardInterrupt, Terminated) as err:
        tracker.close()
        name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
        print(
            f"error: interrupted ({name}); the {len(schedule.running)} running steps were ended (each keeps only "
            f"finished models); rerun this command to run the rest: finished steps are skipped",
            file=sys.stderr,
        )
        sys.exit(code)  # the steps get SIGTERM as their threads end (die_with_parent)
    tracker.close()
    return tracker


def squeue(*args):
    proc = subprocess.run(
        ["squeue", "-h", "-u", pwd.getpwuid(os.getuid()).pw_name, *args], capture_output=True, text=True
    )
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def require_slurm(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            raise MissingError(f"{tool} not found: install Slurm or use --backend local")


def slurm_gpus(partition):
    """1 when the partition (or any, without --partition) has GPU gres, else 0."""
    require_slurm("sinfo")
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%G", *(["-p", partition] if partition else [])], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise MissingError(
            f"Slurm does not answer (sinfo: {proc.stderr.strip() or proc.returncode}); start it or "
            f"set SLURM_CONF, or use --backend local"
        )
    return int("gpu" in proc.stdout)


def submit_slurm(todo, opts, gpus):
    """One job per step, in grid order, depending on the jobs of the steps it needs (afterok) and of the
    step before it in its log (afterany). Jobs of this grid still queued from an earlier driver are adopted."""
    import submitit

    extra = dict(item.split("=", 1) for item in opts.slurm_extra.split(",") if item) if opts.slurm_extra else {}
    queued = {line.split("|", 1)[1]: line.split("|", 1)[0] for line in squeue("-o", "%i|%k") or []}
    executor = submitit.SlurmExecutor(folder=os.path.join(LOG_ROOT, "grid_slurm", "%j"), max_num_timeout=0)
    ids, adopted = {}, 0
    for step in todo:
        key = "wemem-grid-" + hashlib.sha256(f"{REPO} {step.sha256}".encode()).hexdigest()[:16]
        if key in queued:
            ids[step.name], adopted = queued[key], adopted + 1
            continue
        if os.path.exists(step.record):  # stale (a step it needs reruns, or --force): not a sign of success
            os.remove(step.record)
        ok = [ids[name] for name in step.needs if name in ids]
        any_ = [ids[name] for name in step.after if name in ids]
        dependency = ",".join(
            f"{kind}:{':'.join(jobs)}" for kind, jobs in (("afterok", ok), ("afterany", any_)) if jobs
        )
        executor.update_parameters(
            job_name=step.name,
            partition=opts.partition,
            time=opts.time,
            cpus_per_task=opts.cpus_per_job,
            gres=f"gpu:{gpus}" if gpus else None,
            mem=f"{opts.mem_gb}GB" if opts.mem_gb else None,
            comment=key,
            additional_parameters={
                **extra,
                **({"dependency": dependency, "kill_on_invalid_dep": "yes"} if dependency else {}),
            },
        )
        try:
            ids[step.name] = executor.submit(slurm_job, REPO, step, "0" if gpus else "-1", opts.retries).job_id
        except Exception as err:  # sbatch refused: a bad --partition, --time or --slurm_extra
            mine = [job for name, job in ids.items() if job not in queued.values()]
            if mine:
                subprocess.run(["scancel", *mine], capture_output=True)
            raise UsageError(
                f"sbatch refused {step.name} ({last_line(str(err))}); the {len(mine)} jobs "
                f"submitted before it were cancelled; check --partition, --time, --slurm_extra"
            )
    print(
        f"submitted {len(todo) - adopted} Slurm jobs"
        + (f", adopted {adopted} still queued" if adopted else "")
        + f"; their files are in {LOG_ROOT}/grid_slurm/<job id>/",
        file=sys.stderr,
    )
    return ids


def wait_slurm(todo, done, ids):
    """Poll the records and squeue until every job has ended; a job that left the queue without a record
    (looked at twice, for a shared filesystem's delay) failed, or was cancelled as its dependency failed."""
    state, tracker = dict.fromkeys(done, "done"), Tracker(todo)
    waiting, gone, no_answer = list(todo), Counter(), 0
    while waiting:
        lines = squeue("-o", "%i %T")
        if lines is None:
            no_answer += 1
            if no_answer > 20:
                raise MissingError("squeue fails; the jobs go on: rerun the same grid.py command to wait for them")
            time.sleep(POLL_S)
            continue
        active = {job: job_state for job, job_state in (line.split()[:2] for line in lines)}
        ours = Counter(active.get(ids[step.name]) for step in waiting)
        running, pending = ours["RUNNING"], ours["PENDING"]
        for step in list(waiting):
            job = ids[step.name]
            record = read_record(step.record) or {}
            if record.get("sha256") == step.sha256:
                how, why = "done", ""
            elif active.get(job) in ACTIVE:
                if active[job] == "PENDING" and any(state.get(n) in ("failed", "skipped") for n in step.needs):
                    subprocess.run(["scancel", job], capture_output=True)  # if kill-on-invalid-dep did not
                continue
            else:
                gone[step.name] += 1
                if gone[step.name] < 2:
                    continue
                if any(state.get(need) in ("failed", "skipped") for need in step.needs):
                    how, why = "skipped", ""
                else:
                    submitit_err = os.path.join(LOG_ROOT, "grid_slurm", job, f"{job}_0_log.err")
                    why = f"Slurm job {job}: " + (
                        last_line_of(step.output("err"))
                        or last_line_of(submitit_err)
                        or "left the queue without a result (cancelled, timed out?)"
                    )
                    how = "failed"
            state[step.name] = how
            waiting.remove(step)
            tracker.finish(step, how, why, seconds=record.get("seconds"), running=running, pending=pending)
        tracker.show(running)
        if waiting:
            time.sleep(POLL_S)
    tracker.close()
    return tracker


# ---------------------------------------------------------------- the end


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


def summarize():
    """python summarize.py log --markdown --plot, its table also kept in log/grid/results.md."""
    table = os.path.join(LOG_ROOT, "grid", "results.md")
    os.makedirs(os.path.dirname(table), exist_ok=True)
    with open(table, "w") as out:
        proc = subprocess.run(
            [sys.executable, "summarize.py", LOG_ROOT, "--markdown", "--plot"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    if proc.returncode == 0:
        print(f"results: table in results.csv and {table} (Markdown), plot in tradeoff.png", file=sys.stderr)
    else:
        print(f"summarize.py: {last_line(proc.stderr)}", file=sys.stderr)


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
    if not args.no_summary and (tracker.counts["done"] or done):
        summarize()
    if tracker.failed or tracker.skipped:
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
