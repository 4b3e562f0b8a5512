"""From a checked grid to its steps: their names, commands and order (expand), the commands' own checks,
what is left to run after --only and resume (plan), the mem-score check, and --dry_run's script."""

import fnmatch
import importlib
import os
import re
import shlex
import sys
from collections import Counter
from types import SimpleNamespace

from auto_settings import AUTO
from common import UsageError
from gridrun.spec import SCRIPTS, SETTINGS
from gridrun.step import GPU, REPO, Step, read_record
from paths import DEFAULT_SEED, log_dir, log_path, memscore_path, run_name, tagged


def flags_of(overrides):
    """{flag: value} -> ['--flag', 'value', ...]; true is the bare flag, false leaves it out."""
    argv = []
    for flag, value in overrides.items():
        if value is not False:
            argv += [f"--{flag}"] + ([] if value is True else [str(value)])
    return argv


def expand(grid):
    """Every step of the grid, in an order that respects its dependencies; each config's unpruned attack
    (original) comes right after its pretraining, so that the reference arrives first. An audit grid's
    steps are audit.py's (expand_audit)."""
    if grid.audit:
        return expand_audit(grid)
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
            plans = [(sparsity, list(zip(grid.settings[config], tags))) for sparsity in grid.sparsities]
            if grid["control"] and 0.0 not in grid.sparsities:  # Base, the same schedule, no weight removed
                from defenses import Base

                plans.insert(0, (0.0, [(("control", Base, {}), "")]))
            for sparsity, settings in plans:
                where = ["--pruner_name", pruner, "--prune_sparsity", str(sparsity)]
                base_prune, defended = None, []
                for (i, cls, setting), tag in settings:
                    entry = i if i == "control" else f"defenses[{i}]"
                    origin = f"config {config}, seed {seed}, sparsity {sparsity}, {entry}" + (
                        f" {setting}" if setting else ""
                    )
                    auto = cls.auto_flags(SimpleNamespace(**setting))  # settings derived from the data: named so
                    prefix = cls.prefix(pruner, sparsity, setting.get("defend_arg"), grid["semantics"], bool(auto))
                    prefix = tagged(prefix, tag)
                    log = log_path(
                        SimpleNamespace(
                            **vars(ns), pruner_name=pruner, prune_sparsity=sparsity, defend=cls.name, tag=tag
                        ),
                        bool(auto),
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
                            *flags_of(dict.fromkeys(auto, AUTO)),  # mia_modi.py finds the auto run by them
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


def expand_audit(grid):
    """The audit's steps (audit_plan.audit_steps: one per model group for pretrain and prune) for every config
    and seed, named <run>/audit.<its step name>, each needing what it needs there. The grid's defenses (with
    their --tag where two share a name), pruner, sparsity, prune_iter and semantics become audit.py's flags,
    the audit section's keys too; overrides.audit goes to every step."""
    from auditing.plan import audit_steps

    section, steps = grid["audit"], []
    flags = lambda keys, values: [f for k in keys if k in values for f in (f"--{k}", str(values[k]))]
    audited = flags(("canaries", "audit_top_memscore"), section)
    semantics = ["--semantics", grid["semantics"]] if grid["semantics"] != "release" else []
    attack = flags(("rmia_gamma", "bootstrap"), section)
    tag = flags(("audit_tag",), section)
    for config in grid.configs:
        cfg, pruner = grid.loaded[config], grid.pruners[config]
        pruning = ["--pruner_name", pruner, "--prune_sparsity", str(grid.sparsities[0])]
        pruning += ["--prune_iter", str(grid["prune_iter"]), *flags(("prune_epochs", "early_stop"), section)]
        pruning += semantics
        defenses = []
        for (_, cls, setting), setting_tag in zip(grid.settings[config], grid.tags(config)):
            ordered = {k: setting[k] for k in SETTINGS if k in setting}  # a stable order: names and hashes stay
            ordered.update({k: setting[k] for k in ("semantics", "tuned") if k in setting})
            defenses.append({"defend": cls.name, **ordered, **({"tag": setting_tag} if setting_tag else {})})
        for seed in grid["seeds"]:
            ns = SimpleNamespace(dataset_name=cfg["dataset_name"], model_name=cfg["model_name"], seed=seed)
            run = run_name(ns)
            seeded = ["--seed", str(seed)] if seed != DEFAULT_SEED else []
            common = [*seeded, *tag, *flags(("early_stop_pretrain",), section)]
            common += [*flags_of(grid["overrides"].get("audit", {})), "--quiet"]
            listed = audit_steps(
                config,
                GPU,
                section.get("models", 32),
                section.get("group_size", 8),
                audited,
                defenses,
                pruning,
                section.get("with_dp", False),
                attack,
                common,
                tune=flags(("trials", "tuning_models", "target_acc", "tolerance"), section.get("tune", {})),
                tune_workers=section.get("tune", {}).get("workers", 1),
                control=section.get("control", False),
            )
            for s in listed:
                steps.append(
                    Step(
                        f"{run}/audit.{s.name}",
                        "audit",
                        s.argv,
                        os.path.join(log_dir(ns), tagged("audit", section.get("audit_tag", "")), f"{s.name}.txt"),
                        needs=[f"{run}/audit.{n}" for n in s.needs],
                        origin=f"config {config}, seed {seed}, audit step {s.name}",
                    )
                )
    check_unique(grid, steps)
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
        key = (script, step.argv[1], step.argv[3]) if step.kind == "audit" else (script, config)  # each audit step
        if key in seen:
            continue
        seen.add(key)
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
    kinds = ", ".join(f"{kind} {counts[kind]}" for kind in SCRIPTS if kind != "audit" or counts[kind])
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
