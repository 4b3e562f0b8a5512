"""The worst-case privacy audit of every defense (docs/audit.md): canaries, M models on random halves of the
pool, iterative pruning under a defense, leave-one-out LiRA and RMIA pooled over the M targets, TPR at 0.1 % and
1 % FPR next to test accuracy, and a DP-SGD baseline tuned to the same test accuracy.

python audit.py prepare   GPU-ID CONFIG [--models 32 (>= 3)] [--canaries K | --audit_top_memscore K]
python audit.py pretrain  GPU-ID CONFIG --group G [--group_size 8]
python audit.py memscore  GPU-ID CONFIG
python audit.py prune     GPU-ID CONFIG --group G [--group_size 8] --defend NAME [defense flags] [pruning flags]
python audit.py attack    GPU-ID CONFIG (--original | --defend NAME [defense flags] [pruning flags])
                          (prune and attack: --tuned for the setting `tune` chose, instead of defense flags)
python audit.py tune      GPU-ID CONFIG --defend NAME [--trials 12] [--tuning_models 16] [--study WHERE]
                          [--target_acc A] [--tolerance 1] [--worker K/W] [pruning flags]
python audit.py summarize GPU-ID CONFIG [--out DIR]
python audit.py compare   GPU-ID CONFIG --seeds 7,8,9 [--out DIR]
python audit.py all       GPU-ID CONFIG [prepare flags] [pruning flags] [--defense NAME[:flag=value,...|:tuned]]...
                          [--with_dp] [--control] [--trials 12] [--tuning_models 16] [--target_acc A]
                          [--tolerance 1] [--group_size 8]

Every step is idempotent: what it would write and is already there, made from the same inputs and settings,
is skipped ("Nothing to do"), so a rerun (or a grid that resumes) does only the missing work. Model folders are
written through train.Staging and finished with a completion record; every other file atomically. A step is done
only while its files are as it wrote them (their SHA-256 in its record): a broken one is redone, and a step that
reads one names it and the command that rebuilds it. --models is at least 3 (docs/audit.md). Flags shared
by all steps: --seed (the audit's draws and its folder, as in the other scripts), --audit_tag T (a second audit
of the same run: <run>/audit_tag-T), the config keys, --batch_size, --quiet. The dp defense takes its noise
multiplier as --defend_arg, or with --tuned from tune --defend dp. audit_plan.audit_steps() lists the steps in
dependency order.

This file is the command line (flags, checks, the step dispatch, `all`) and resolves a step's settings once
(auditing/settings.py); the steps live in auditing/: train.py (prepare, pretrain, memscore, prune), attack.py
(attack, summarize, compare) and tune.py (tune), what they share in shared.py.
"""

import argparse
import math
import shlex
import sys
import time

from auditing.attack import attack, compare, summarize
from auditing.loo_attacks import LIRA_MIN_MODELS, RMIA_MIN_MODELS
from auditing.plan import audit_steps, parse_defense
from auditing.settings import AuditSettings, with_defense
from auditing.train import memscore, prepare, pretrain, prune
from auditing.tune import TRIALS, TUNE_MODELS, apply_tuned, tune
from auditing.tuning import Worker, worker_type
from common import (
    UsageError,
    base_parser,
    main_guard,
    parse_args,
)
from defenses import add_defense_flags, get_defense
from intervals import RESAMPLES
from models import build_model
from pruning import (
    add_pruning_flags,
    check_prune_iter,
    check_pruning_flags,
    prunable_layers,
    tag_type,
)
from splits import check_config

STEPS = ("prepare", "pretrain", "memscore", "prune", "attack", "tune", "summarize", "compare", "all")
RETIRED = {
    "tune_dp": "the DP-SGD baseline's noise is tuned as every defense's setting now: run audit.py tune --defend dp "
    "--semantics corrected ..., then prune and attack with --defend dp --tuned (all: --with_dp does all three)"
}


def common_parser(step: str) -> argparse.ArgumentParser:
    parser = base_parser(f"audit.py {step}: " + __doc__.split("\n\n")[0])
    parser.prog = f"audit.py {step}"
    parser.add_argument("--audit_tag", default="", type=tag_type, help="a second audit of this run: audit_tag-<T>/")
    return parser


def add_group_flags(parser) -> None:
    parser.add_argument("--group", type=int, required=True, help="model group: models G*S .. G*S+S-1")
    parser.add_argument("--group_size", type=int, default=8, help="models per group (S)")


def add_prune_flags(parser) -> None:
    """prune_modi.py's pruning and defense flags; --defend_arg has no default here (dp: the tuned noise)."""
    add_pruning_flags(parser)
    parser.add_argument("--prune_iter", type=int, default=5)
    parser.add_argument("--prune_epochs", type=int, default=21, help="fine-tuning epochs per iteration")
    parser.add_argument("--early_stop", type=int, default=5, help="epochs without dev improvement; 0 = off")
    add_defense_flags(parser)
    parser.set_defaults(defend_arg=None)


def build_parser(step: str) -> argparse.ArgumentParser:
    parser = common_parser(step)
    if step in ("prepare", "all"):
        parser.add_argument("--models", type=int, default=32, help="M, the audited models (>= 3)")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--canaries", type=int, default=None, help="K mislabelled pool rows (default: see --help)")
        group.add_argument("--audit_top_memscore", type=int, default=None, help="audit the K top mem-score rows")
    if step in ("pretrain", "prune"):
        add_group_flags(parser)
    if step in ("pretrain", "tune", "all"):
        parser.add_argument("--early_stop_pretrain", type=int, default=5, help="pretraining's early stop")
    if step in ("prune", "attack", "tune", "all"):
        add_prune_flags(parser)
    if step == "prune":
        parser.add_argument("--sequential", action="store_true", help="Base model by model, not batched")
    if step in ("attack", "all"):
        parser.add_argument("--rmia_gamma", type=float, default=1.0, help="RMIA's gamma (> 0)")
        parser.add_argument("--bootstrap", type=int, default=RESAMPLES, help="cluster-bootstrap resamples")
    if step == "attack":
        parser.add_argument("--original", action="store_true", help="attack the unpruned (pretrained) models")
    if step in ("prune", "attack"):
        parser.add_argument("--tuned", action="store_true", help="the setting audit.py tune chose (tag: tuned)")
    if step in ("prune", "attack", "tune", "all"):
        parser.add_argument("--tuning_models", type=int, default=TUNE_MODELS, help="tuning models (>= 3)")
    if step in ("tune", "all"):
        parser.add_argument("--trials", type=int, default=TRIALS, help="complete trials a tune study ends with")
    if step == "tune":
        parser.add_argument("--study", default=None, help="journal file or storage URL (default: tuning/<stage>)")
        parser.add_argument("--worker", default=Worker(), type=worker_type, help="K/W: worker K of W runs its share")
    if step in ("tune", "all"):
        parser.add_argument("--target_acc", type=float, default=None, help="default: Base-pruned tuning mean - 1")
        parser.add_argument("--tolerance", type=float, default=1.0, help="accepted accuracy under the target")
    if step == "compare":
        parser.add_argument("--seeds", required=True, help="the audits' seeds, e.g. 7,8,9 (each its own --seed run)")
    if step in ("summarize", "compare", "all"):
        parser.add_argument("--out", default=None, help="folder for audit.csv and the figures (default: the audit's)")
    if step == "all":
        parser.add_argument("--defense", action="append", default=None, help="NAME[:flag=value,...], repeatable")
        parser.add_argument("--with_dp", action="store_true", help="add the utility-matched DP-SGD baseline")
        parser.add_argument("--control", action="store_true", help="add Base at sparsity 0: fine-tuned, not pruned")
        parser.add_argument("--group_size", type=int, default=8)
    return parser


def get_args(argv=None):
    """argv: STEP GPU-ID CONFIG [flags]. With -h alone: the usage of every step (one paragraph, all flags) and
    this docstring; `STEP --help` shows the step's own."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        flags = sorted({o for step in STEPS for a in build_parser(step)._actions for o in a.option_strings})
        print(f"usage: audit.py {{{','.join(STEPS)}}} GPU-ID CONFIG [{'] ['.join(flags)}]\n\n{__doc__}")
        raise SystemExit(0)
    step = argv[0]
    if step not in STEPS:
        if step in RETIRED:
            raise UsageError(f"audit.py {step} is retired: {RETIRED[step]}")
        raise UsageError(f"unknown step '{step}'; valid: {', '.join(STEPS)} (python audit.py STEP GPU-ID CONFIG ...)")
    args = parse_args(build_parser(step), argv[1:])
    args.step, args.argv = step, argv[1:]
    check_config(args)
    check_step_args(args)
    return args


def check_step_args(args) -> None:
    if getattr(args, "models", LIRA_MIN_MODELS) < LIRA_MIN_MODELS:
        raise UsageError(
            f"--models must be >= {LIRA_MIN_MODELS}, got {args.models}: leave-one-out LiRA scores a row on a target "
            f"model from an IN and an OUT reference among the other M - 1 models, so it needs M - 1 >= 2 (with 2 "
            f"models every LiRA score is 0 and its AUC 0.5); RMIA needs {RMIA_MIN_MODELS - 1} other model"
        )
    for flag in ("canaries", "audit_top_memscore"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    if getattr(args, "group_size", 1) < 1 or getattr(args, "group", 0) < 0:
        raise UsageError(f"--group must be >= 0 and --group_size >= 1, got {args.group} and {args.group_size}")
    if getattr(args, "tuning_models", 2) < 1:
        raise UsageError(f"--tuning_models must be >= 1, got {args.tuning_models}")
    if not (math.isfinite(getattr(args, "rmia_gamma", 1.0)) and getattr(args, "rmia_gamma", 1.0) > 0):
        raise UsageError(f"--rmia_gamma must be a finite number > 0, got {args.rmia_gamma}")
    if getattr(args, "trials", 1) < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    if getattr(args, "tuned", False) and not get_defense(args.defend).search_space:
        raise UsageError(f"--tuned reads the setting audit.py tune chose; --defend {args.defend or 'base'} has none")
    if getattr(args, "control", False) and args.prune_sparsity == 0:
        raise UsageError("--control adds Base at sparsity 0, which --prune_sparsity 0 already is; drop --control")
    if getattr(args, "bootstrap", 0) < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if hasattr(args, "seeds"):
        try:
            args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            args.seed_list = []
        if len(args.seed_list) < 2:
            raise UsageError(f"--seeds must list two or more seeds, e.g. 7,8,9; got {args.seeds!r}")
    if hasattr(args, "prune_iter"):
        if getattr(args, "original", False) and args.defend not in ("", "base"):
            raise UsageError(
                f"--original attacks the unpruned models, which have no defense; drop --defend {args.defend}"
            )
        check_pruning_flags(args.pruner_name, args.prune_sparsity)
        if args.prune_iter < 1 or args.prune_epochs < 1:
            raise UsageError(
                f"--prune_iter and --prune_epochs must be >= 1, got {args.prune_iter} and {args.prune_epochs}"
            )
        check_prune_iter(args.pruner_name, args.prune_iter)
        prunable_layers(build_model(args.model_name, args.num_cls, args.input_dim), args.pruner_name)
        get_defense(args.defend)


def run_all(audit) -> None:
    """Every step of audit_steps() in order, in this process."""
    args = audit.flags
    explicit = set()
    for token in args.argv:
        if token.startswith("--"):
            explicit.add(token[2:].split("=")[0])
    flag_value = lambda k: [f"--{k}", str(getattr(args, k))]
    common = [f for k in ("seed", "audit_tag", "batch_size", *CONFIG_FLAGS) if k in explicit for f in flag_value(k)]
    common += [f"--{k}" for k in ("quiet", "amp", "no_tensorboard") if getattr(args, k)]
    audited = [f for k in ("canaries", "audit_top_memscore") if k in explicit for f in flag_value(k)]
    pruning = [
        f for k in ("pruner_name", "prune_sparsity", "prune_iter", "prune_epochs", "early_stop") for f in flag_value(k)
    ]
    if "early_stop_pretrain" in explicit:
        common += flag_value("early_stop_pretrain")
    attack_flags = [f for k in ("rmia_gamma", "bootstrap") for f in flag_value(k)]
    defenses = [parse_defense(s) for s in (args.defense or ["base"])]
    steps = audit_steps(
        args.config_path,
        str(args.gpu_id),
        args.models,
        args.group_size,
        audited,
        defenses,
        pruning,
        args.with_dp,
        attack_flags,
        common,
        args.out,
        [f for k in ("trials", "tuning_models", "target_acc", "tolerance") if k in explicit for f in flag_value(k)],
        args.control,
    )
    for s in steps:
        started = time.time()
        print(f"== audit step {s.name}: python {shlex.join(s.argv)}", flush=True)
        main(s.argv[1:])
        print(f"== audit step {s.name} done in {time.time() - started:.1f}s", flush=True)


CONFIG_FLAGS = ("dataset_name", "model_name", "epochs", "num_cls", "input_dim", "optimizer", "lr", "weight_decay")


RUNNERS = {
    "prepare": prepare,
    "pretrain": pretrain,
    "memscore": memscore,
    "prune": prune,
    "attack": attack,
    "tune": tune,
    "summarize": summarize,
    "compare": compare,
    "all": run_all,
}


def settings_of(args) -> AuditSettings:
    """The step's settings, resolved once: its folders and run; with --tuned the chosen setting; the defense of a
    step that prunes, attacks or tunes, with its settings and stage."""
    audit = AuditSettings.of(args.step, argparse.Namespace(**vars(args)))
    if getattr(args, "tuned", False):
        audit = apply_tuned(audit)
    if args.step in ("prune", "attack", "tune"):
        audit = with_defense(audit)
    return audit


def main(argv=None) -> None:
    args = get_args(argv)
    RUNNERS[args.step](settings_of(args))


if __name__ == "__main__":
    main_guard(main)
