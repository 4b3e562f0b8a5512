"""The worst-case privacy audit of every defense (docs/audit.md): canaries, M models on random halves of the
pool, iterative pruning under a defense, leave-one-out LiRA and RMIA pooled over the M targets, TPR at 0.1 % and
1 % FPR next to test accuracy, and a DP-SGD baseline tuned to the same test accuracy.

python audit.py prepare   GPU-ID CONFIG [--models 32] [--canaries K | --audit_top_memscore K]
python audit.py pretrain  GPU-ID CONFIG --group G [--group_size 8]
python audit.py memscore  GPU-ID CONFIG
python audit.py prune     GPU-ID CONFIG --group G [--group_size 8] --defend NAME [defense flags] [pruning flags]
python audit.py attack    GPU-ID CONFIG (--original | --defend NAME [defense flags] [pruning flags])
python audit.py tune_dp   GPU-ID CONFIG [--target_acc A] [--noise 0.5,1,2,4,8] [--tuning_models 4] [pruning flags]
python audit.py summarize GPU-ID CONFIG [--out DIR]
python audit.py all       GPU-ID CONFIG [prepare flags] [pruning flags] [--defense NAME[:flag=value,...]]...
                          [--with_dp] [--group_size 8]

Every step is idempotent: what it would write and is already there, made from the same inputs and settings,
is skipped ("Nothing to do"), so a rerun (or a grid that resumes) does only the missing work. Model folders are
written through train.Staging and finished with a completion record; every other file atomically. Flags shared
by all steps: --seed (the audit's draws and its folder, as in the other scripts), --audit_tag T (a second audit
of the same run: <run>/audit_tag-T), the config keys, --batch_size, --quiet. The dp defense without
--defend_arg reads the noise multiplier tune_dp picked. audit_steps() lists the steps in dependency order.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np
import pandas as pd
import torch

import audit_report
from audit_plan import TUNING_OFFSET, Plan, default_canaries, feldman_memscores, membership, model_seed
from common import (
    MissingError,
    RunLog,
    UsageError,
    atomic_write,
    base_parser,
    main_guard,
    parse_args,
    pick_device,
    seed_everything,
)
from datasets import TensorData, get_dataset
from defenses import DEFENSES, DefenseSettings, add_defense_flags, get_defense
from ensemble import EnsembleOptimizer, fit_ensemble, predict_ensemble
from intervals import FPR_TARGETS, RESAMPLES, measurable
from loo_attacks import audit_metrics, decile_table, lira_online_loo, rmia_loo
from memscores import fingerprint, read_memscores, read_sidecar, sidecar_path, train_sha256, write_with_sidecar
from models import build_model
from paths import (
    AUDIT_CSV,
    AUDIT_DECILES,
    AUDIT_PLANE,
    AUDIT_PRETRAINED,
    audit_dir,
    audit_dp_noise_path,
    audit_log_path,
    audit_memscore_path,
    audit_model_dir,
    audit_plan_path,
    audit_record_path,
    audit_scores_path,
    checkpoint,
    memscore_path,
    run_name,
    tagged,
)
from progress import Progress
from prune_modi import force_defense_flags, forced_line, prune_model
from pruning import (
    Pruner,
    add_pruning_flags,
    check_prune_iter,
    check_pruning_flags,
    masked_fraction,
    prunable_layers,
    tag_type,
)
from records import code_version, iso, logged, number, utc_now
from splits import ModelSplit, check_config
from train import (
    Staging,
    completion_record,
    evaluate,
    file_sha256,
    is_finished,
    load_model,
    mark_finished,
    save_checkpoint,
)

STEPS = ("prepare", "pretrain", "memscore", "prune", "attack", "tune_dp", "summarize", "all")
ATTACKS = ("LiRA", "RMIA")
SUBSETS = ("audited", "all")  # the audited rows (canaries or top mem-score rows) and every pool row
METRICS = ("AUC",) + tuple(FPR_TARGETS)
DEFAULT_NOISE = (0.5, 1.0, 2.0, 4.0, 8.0)
TUNING_MODELS = 4


# ---------------------------------------------------------------- command lines


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
        parser.add_argument("--models", type=int, default=32, help="M, the audited models")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--canaries", type=int, default=None, help="K mislabelled pool rows (default: see --help)")
        group.add_argument("--audit_top_memscore", type=int, default=None, help="audit the K top mem-score rows")
    if step in ("pretrain", "prune"):
        add_group_flags(parser)
    if step in ("pretrain", "tune_dp", "all"):
        parser.add_argument("--early_stop_pretrain", type=int, default=5, help="pretraining's early stop")
    if step in ("prune", "attack", "tune_dp", "all"):
        add_prune_flags(parser)
    if step == "prune":
        parser.add_argument("--sequential", action="store_true", help="Base model by model, not batched")
    if step in ("attack", "all"):
        parser.add_argument("--rmia_gamma", type=float, default=1.0, help="RMIA's gamma (> 0)")
        parser.add_argument("--bootstrap", type=int, default=RESAMPLES, help="cluster-bootstrap resamples")
    if step == "attack":
        parser.add_argument("--original", action="store_true", help="attack the unpruned (pretrained) models")
    if step in ("tune_dp", "all"):
        parser.add_argument("--target_acc", type=float, default=None, help="default: mean of the WeMeM rows")
        parser.add_argument("--noise", default=None, help=f"noise multipliers tried (default {DEFAULT_NOISE})")
        parser.add_argument("--tuning_models", type=int, default=TUNING_MODELS, help="DP tuning shadows")
        parser.add_argument("--tolerance", type=float, default=1.0, help="accepted |accuracy - target| (points)")
        parser.add_argument("--refine", type=int, default=2, help="bisection steps after the grid")
    if step in ("summarize", "all"):
        parser.add_argument("--out", default=None, help="folder for audit.csv and the figures (default: the audit's)")
    if step == "all":
        parser.add_argument("--defense", action="append", default=None, help="NAME[:flag=value,...], repeatable")
        parser.add_argument("--with_dp", action="store_true", help="add the utility-matched DP-SGD baseline")
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
        raise UsageError(f"unknown step '{step}'; valid: {', '.join(STEPS)} (python audit.py STEP GPU-ID CONFIG ...)")
    args = parse_args(build_parser(step), argv[1:])
    args.step, args.argv = step, argv[1:]
    check_config(args)
    check_step_args(args)
    return args


def check_step_args(args) -> None:
    if getattr(args, "models", 2) < 2:
        raise UsageError(f"--models must be >= 2 (leave-one-out needs other models), got {args.models}")
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
    if getattr(args, "bootstrap", 0) < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if hasattr(args, "noise"):
        args.noise_grid = parse_noise(args.noise)
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


def parse_noise(text) -> list:
    if text is None:
        return list(DEFAULT_NOISE)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise UsageError(f"--noise must be a comma list of noise multipliers > 0, e.g. 0.5,1,2,4; got {text!r}")
    return sorted(set(values))


def again(args, step: str, *flags) -> str:
    """'run python audit.py <step> GPU-ID CONFIG [flags] first'."""
    extra = []
    if args.seed != 7:
        extra += ["--seed", str(args.seed)]
    if args.audit_tag:
        extra += ["--audit_tag", args.audit_tag]
    return (
        "run " + shlex.join(["python", "audit.py", step, str(args.gpu_id), args.config_path, *flags, *extra]) + " first"
    )


# ---------------------------------------------------------------- shared pieces


def load_plan(args) -> tuple:
    """(plan, its SHA-256)."""
    path = audit_plan_path(args)
    plan = Plan.load(path, again(args, "prepare"))
    return plan, file_sha256(path)


def audit_data(args, plan: Plan, device) -> TensorData:
    """The pool (the dataset's training set, with the plan's training labels: canaries relabelled) then the test
    set, on device."""
    train, test = get_dataset(args.dataset_name)
    if (len(train), len(test)) != (plan.n, int(plan.meta["n_test"])) or train_sha256(train.x, train.y) != plan.meta[
        "data_sha256"
    ]:
        raise MissingError(
            f"the data of {args.dataset_name} is not the data the audit plan {audit_plan_path(args)} was made for; "
            f"restore it, or delete {audit_dir(args)} and start again from audit.py prepare"
        )
    labelled = TensorData(train.x, torch.from_numpy(plan.labels), train.mean, train.std)
    return TensorData.concat(labelled, test).to(device, amp=args.amp)


def model_split(plan: Plan, member: np.ndarray, device) -> ModelSplit:
    rows = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)
    return ModelSplit(rows(np.flatnonzero(member)), rows(plan.dev), rows(plan.test))


def group_models(args, models: int) -> list:
    first = args.group * args.group_size
    if first >= models:
        groups = -(-models // args.group_size)
        raise UsageError(
            f"--group {args.group} holds no model: {models} models in groups of {args.group_size} are "
            f"groups 0..{groups - 1}"
        )
    return list(range(first, min(first + args.group_size, models)))


def groups_of(models: list, group_size: int) -> list:
    return sorted({m // group_size for m in models})


def finished(folder: str, plan_sha: str, info: dict) -> bool:
    """folder holds a finished model made from this plan with these settings."""
    if not is_finished(folder):
        return False
    record = completion_record(folder)
    return record.get("split_sha256") == plan_sha and all(record.get(k) == v for k, v in info.items())


def check_other_settings(folders: list, plan_sha: str, info: dict, fix: str) -> None:
    """A finished model of this stage made with other settings is not overwritten silently."""
    for folder in folders:
        record = completion_record(folder) if is_finished(folder) else None
        if record is not None and record.get("split_sha256") == plan_sha and not finished(folder, plan_sha, info):
            changed = sorted(k for k, v in info.items() if record.get(k) != v)
            raise UsageError(f"{folder} holds a model made with other settings ({', '.join(changed)}); {fix}")


def models_sha256(folders: list) -> str:
    """One hash of the checkpoints of a stage (from their completion records)."""
    return hashlib.sha256(" ".join(completion_record(f)["checkpoint_sha256"] for f in folders).encode()).hexdigest()


def require_finished(args, folders: list, plan_sha: str, info: dict, group_size: int, how) -> None:
    missing = [m for m, folder in enumerate(folders) if not finished(folder, plan_sha, info)]
    if missing:
        groups = groups_of(missing, group_size)
        raise MissingError(
            f"{len(missing)} of {len(folders)} models are not finished (e.g. {folders[missing[0]]}); {how(groups)}"
        )


def for_groups(groups) -> str:
    return f" for G in {', '.join(map(str, groups))}"


def pretrain_info(args) -> dict:
    recipe = {k: getattr(args, k) for k in ("epochs", "optimizer", "lr", "weight_decay", "batch_size")}
    return {"stage": AUDIT_PRETRAINED, "recipe": {**recipe, "early_stop": args.early_stop_pretrain}}


PRETRAINED = {"stage": AUDIT_PRETRAINED}  # what later steps ask of a pretrained model (any recipe of this plan)


def pretrained_folders(args, plan, tuning=False) -> list:
    count = args.tuning_models if tuning else plan.models
    return [audit_model_dir(args, AUDIT_PRETRAINED, m, tuning) for m in range(count)]


def require_pretrained(args, plan, plan_sha) -> list:
    folders = pretrained_folders(args, plan)
    group_size = getattr(args, "group_size", 8)
    how = lambda groups: again(args, "pretrain", "--group", "G", "--group_size", str(group_size)) + for_groups(groups)
    require_finished(args, folders, plan_sha, PRETRAINED, group_size, how)
    return folders


def load_models(args, folders, device) -> list:
    return [load_model(args, checkpoint(f), device, "audit checkpoint", "rerun its audit.py step")[0] for f in folders]


def stage_of(args, defense) -> str:
    """The pruned stage's name: prune_modi.py's result prefix (with --tag)."""
    return tagged(defense.prefix(args.pruner_name, args.prune_sparsity, args.defend_arg, args.semantics), args.tag)


def prune_info(args, settings, memscore_sha) -> dict:
    return {
        "stage": stage_of(args, get_defense(args.defend)),
        "defense": get_defense(args.defend).name,
        "settings": dataclasses.asdict(settings),
        "pruning": {k: getattr(args, k) for k in ("pruner_name", "prune_sparsity", "prune_iter", "early_stop")},
        "memscore_sha256": memscore_sha,
    }


def tuned_for(args) -> dict:
    """What the tuned noise depends on besides the plan: dp_noise.json holds it, prune --defend dp compares."""
    keys = ("pruner_name", "prune_sparsity", "prune_iter", "prune_epochs", "early_stop", "semantics", "dp_microbatch")
    keys += ("epochs", "optimizer", "lr", "weight_decay", "batch_size")
    return {k: getattr(args, k) for k in keys}


def resolve_dp_noise(args, plan_sha) -> None:
    """--defend dp without --defend_arg: the noise multiplier tune_dp picked (for these settings); the other
    defenses' --defend_arg defaults to prune_modi.py's 4."""
    if args.defend_arg is not None:
        return
    if get_defense(args.defend).name != "dp":
        args.defend_arg = 4.0
        return
    path = audit_dp_noise_path(args)
    fix = again(args, "tune_dp", *dp_flags(args))
    if not os.path.isfile(path):
        raise MissingError(
            f"--defend dp without --defend_arg reads the tuned noise multiplier {path}, not found; {fix}"
        )
    tuned = read_json(path, fix)
    if tuned.get("plan_sha256") != plan_sha or tuned.get("tuned_for") != json.loads(json.dumps(tuned_for(args))):
        raise MissingError(f"{path} was tuned for another plan or other pruning/DP settings than these; {fix}")
    args.defend_arg = float(tuned["noise"])


def dp_flags(args) -> list:
    flags = ["--pruner_name", args.pruner_name, "--prune_sparsity", str(args.prune_sparsity)]
    flags += ["--prune_iter", str(args.prune_iter), "--semantics", args.semantics]
    return flags


def read_json(path, fix):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise MissingError(f"{path} is unreadable ({type(err).__name__}); delete it and {fix}")


def write_json(path, record) -> None:
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_if_changed(path, content: bytes) -> bool:
    """Write content atomically unless the file already holds exactly it (a rerun changes no file)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == content:
                return False
    atomic_write(path, lambda f: f.write(content))
    return True


class NullLog:
    def write(self, line):
        pass


def generators(seeds, device) -> list:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def build_models(args, seeds, device) -> list:
    """Fresh models of the config's architecture, model i initialised under torch.manual_seed(seeds[i])."""
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model(args.model_name, args.num_cls, args.input_dim).to(device))
    return out


def test_accuracy(logits, labels) -> np.ndarray:
    """(M,) accuracy % of each model's logits (M, n, C) on labels (n,)."""
    return 100.0 * (np.asarray(logits).argmax(2) == np.asarray(labels)[None]).mean(1)


# ---------------------------------------------------------------- prepare


def prepare(args) -> None:
    path = audit_plan_path(args)
    train, test = get_dataset(args.dataset_name)
    n = len(train)
    options = {"models": args.models, "canaries": args.canaries, "audit_top_memscore": args.audit_top_memscore}
    if args.audit_top_memscore is None and args.canaries is None:
        options["canaries"] = default_canaries(args.models, n)
    k = options["audit_top_memscore"] or options["canaries"]
    if k > n:
        raise UsageError(
            f"{k} audited rows do not fit the pool of {n} training rows of {args.dataset_name}; pass at most {n}"
        )
    if os.path.isfile(path):
        plan = Plan.load(path, again(args, "prepare"))
        if plan.meta.get("options") != json.dumps(options, sort_keys=True):
            raise UsageError(
                f"the audit plan {path} exists with other options ({plan.meta.get('options')}); delete "
                f"{audit_dir(args)} to start another audit, or pass --audit_tag T for one beside it"
            )
        print(f"Nothing to do: the audit plan {path} exists with these options")
        return
    top_rows = None
    if args.audit_top_memscore:
        from memscores import load_memscores

        top = load_memscores(args, train).numpy()
        top_rows = np.argsort(-top, kind="stable")[: args.audit_top_memscore]
    plan = Plan.create(
        train.y.numpy(),
        len(test),
        args.num_cls,
        args.models,
        args.seed,
        canaries=options["canaries"],
        top_rows=top_rows,
        dataset=args.dataset_name,
        data_sha256=train_sha256(train.x, train.y),
        options=json.dumps(options, sort_keys=True),
    )
    plan.save(path)
    log = RunLog(audit_log_path(args, "plan"))
    outs = int((~plan.member[:, plan.audited]).sum())
    what = (
        f"{k} canaries"
        if plan.meta["mode"] == "canaries"
        else f"the {k} top mem-score rows of {memscore_path(args.dataset_name, args.model_name)}"
    )
    log.write(f"{run_name(args)} audit plan: {args.models} models, each on {n // 2} of {n} pool rows; audited: {what}")
    log.write(f"Dev rows {len(plan.dev)}, test rows {len(plan.test)} (the test set cut 34/66)")
    for metric, fpr in FPR_TARGETS.items():
        ok = "measurable" if measurable(metric, outs) else f"not measurable (needs {math.ceil(10 / fpr)})"
        log.write(f"Audited non-member decisions: {outs}; {metric} {ok}")
    log.write(f"Wrote {path}")
    log.close()


# ---------------------------------------------------------------- pretrain


def pretrain(args) -> None:
    plan, plan_sha = load_plan(args)
    group = group_models(args, plan.models)
    train_models(args, plan, plan_sha, group, plan.member, False, f"group {args.group}")


def train_models(args, plan, plan_sha, models, member, tuning, what) -> None:
    """Pretrain the listed models (audited or tuning shadows) as one batched ensemble; skip finished ones."""
    info = pretrain_info(args)
    folders = {m: audit_model_dir(args, AUDIT_PRETRAINED, m, tuning) for m in models}
    todo = [m for m in models if not finished(folders[m], plan_sha, info)]
    check_other_settings([folders[m] for m in todo], plan_sha, info, f"delete {audit_dir(args)} to start again")
    if not todo:
        print(f"Nothing to do: the {what} models are pretrained")
        return
    device = pick_device(args.gpu_id)
    data = audit_data(args, plan, device)
    offset = TUNING_OFFSET if tuning else 0
    splits = {m: model_split(plan, member[m], device) for m in todo}
    nets = build_models(args, [model_seed(args.seed, "init", offset + m) for m in todo], device)
    gens = generators([model_seed(args.seed, "shuffle", offset + m) for m in todo], device)
    # a group's own log: groups run in parallel, and a RunLog holds its file from the first line to the last
    name = "tuning_pretrained" if tuning else f"{AUDIT_PRETRAINED}.group{args.group}"
    log = RunLog(audit_log_path(args, name))
    log.write(f"{run_name(args)} audit pretrain {what}: models {todo[0]}..{todo[-1]}, epochs {args.epochs}")
    start = time.time()
    with Staging([folders[m] for m in todo]) as staging:
        dev = splits[todo[0]].dev
        best = fit_ensemble(
            nets,
            data,
            [splits[m].train for m in todo],
            dev,
            args.epochs,
            args.batch_size,
            args.lr,
            args.optimizer,
            args.weight_decay,
            gens,
            early_stop=args.early_stop_pretrain,
        )
        for m, net, staged, epoch in zip(todo, nets, staging.staged, [fit.best_epoch for fit in best]):
            dev_acc, dev_loss = evaluate(net, data, dev)
            test_acc, test_loss = evaluate(net, data, splits[m].test)
            save_checkpoint(checkpoint(staged), net, epoch, dev_acc, dev_loss)
            mark_finished(staged, audit_plan_path(args), script="audit.py pretrain", model=m, epoch=epoch, **info)
            log.write(
                f"model {m}: epoch {epoch}, dev Accuracy {dev_acc:.3f}, test Accuracy {test_acc:.3f}, "
                f"Loss {test_loss:.3f}"
            )
        staging.publish()
    log.write(f"Total pretrain time: {time.time() - start:.3f}s")
    log.close()


# ---------------------------------------------------------------- memscore


def memscore(args) -> None:
    """Feldman's mem-scores of the pool (training labels, canaries included) from the M pretrained models, in the
    mem-score CSV format with its fingerprint (memscores.py), which the audit's defenses read."""
    plan, plan_sha = load_plan(args)
    folders = require_pretrained(args, plan, plan_sha)
    stamp = models_sha256(folders)
    path = audit_memscore_path(args)
    if memscore_current(args, path, stamp):
        print(f"Nothing to do: {path} holds the mem-scores of these pretrained models")
        return
    device = pick_device(args.gpu_id)
    data = audit_data(args, plan, device)
    pool = torch.arange(plan.n, device=device)
    logits = predict_ensemble(load_models(args, folders, device), data, pool).cpu().numpy()
    correct = logits.argmax(2) == plan.labels[None]
    scores, lacking = feldman_memscores(correct, plan.member)
    fields = fingerprint(args.dataset_name, args.model_name, data.x[: plan.n], data.y[: plan.n], memscore_source(plan))
    write_with_sidecar(path, pd.DataFrame(scores).to_csv().encode(), {**fields, "models_sha256": stamp})
    log = RunLog(audit_log_path(args, "memscore"))
    log.write(f"{run_name(args)} audit mem-scores of {plan.n} pool rows from {plan.models} pretrained models")
    log.write(
        f"Mean {scores.mean():.3f}, {int((scores >= 0.5).sum())} rows >= 0.5; audited rows: mean "
        f"{scores[plan.audited].mean():.3f}; rows without an IN or an OUT model (score 0): {lacking}"
    )
    log.write(f"Wrote {path}")
    log.close()


def memscore_source(plan) -> str:
    return f"audit plan ({plan.meta['mode']}, {len(plan.audited)} audited rows, seed {plan.meta['seed']})"


def memscore_current(args, path, stamp) -> bool:
    if not (os.path.isfile(path) and os.path.isfile(sidecar_path(path))):
        return False
    try:
        sidecar = read_sidecar(sidecar_path(path), "")
    except MissingError:
        return False
    with open(path, "rb") as f:
        csv_sha = hashlib.sha256(f.read()).hexdigest()
    return sidecar.get("models_sha256") == stamp and sidecar["csv_sha256"] == csv_sha


def read_audit_memscores(args, plan, plan_sha, data) -> tuple:
    """(mem-scores tensor, models stamp) written by the memscore step for the current pretrained models."""
    path = audit_memscore_path(args)
    stamp = models_sha256(require_pretrained(args, plan, plan_sha))
    fix = again(args, "memscore")
    if not memscore_current(args, path, stamp):
        raise MissingError(f"the audit's mem-scores {path} are missing or were made from other models; {fix}")
    sidecar = read_sidecar(sidecar_path(path), fix)
    if sidecar["train_sha256"] != train_sha256(data.x[: plan.n], data.y[: plan.n]):
        raise MissingError(f"the audit's mem-scores {path} score another pool or other labels; {fix}")
    return read_memscores(path, plan.n, fix), stamp


# ---------------------------------------------------------------- prune


def prepare_prune_args(args, plan_sha) -> tuple:
    resolve_dp_noise(args, plan_sha)
    force_defense_flags(args)
    defense, settings = get_defense(args.defend), DefenseSettings.from_args(args)
    defense.check_args(settings)
    return defense, settings


def prune(args) -> None:
    plan, plan_sha = load_plan(args)
    defense, settings = prepare_prune_args(args, plan_sha)
    group = group_models(args, plan.models)
    device = pick_device(args.gpu_id)
    data = audit_data(args, plan, device)
    memscores, stamp = read_audit_memscores(args, plan, plan_sha, data) if defense.needs_memscore else (None, None)
    stage = stage_of(args, defense)
    info = prune_info(args, settings, stamp)
    folders = {m: audit_model_dir(args, stage, m) for m in group}
    todo = [m for m in group if not finished(folders[m], plan_sha, info)]
    check_other_settings([folders[m] for m in todo], plan_sha, info, "pass --tag T to keep both settings")
    if not todo:
        print(f"Nothing to do: group {args.group} of {stage} is pruned")
        return
    sources = require_pretrained(args, plan, plan_sha)
    if memscores is not None:
        defense.check_memscores(memscores, settings, audit_memscore_path(args))
    splits = {m: model_split(plan, plan.member[m], device) for m in todo}
    log = RunLog(audit_log_path(args, f"{stage}.group{args.group}"))  # its own: groups run in parallel
    log.write(f"{run_name(args)} audit prune {stage} group {args.group}: models {todo[0]}..{todo[-1]}")
    log.write(f"Semantics: {args.semantics}")
    if forced_line(args, defense):
        log.write(forced_line(args, defense))
    first = splits[todo[0]].train
    scores = None if memscores is None else memscores[first.cpu()]
    for line in defense.header_lines(settings, data.y[first], scores, memscores):
        log.write(line)
    batched = defense.name == "base" and not args.sequential
    start = time.time()
    with Staging([folders[m] for m in todo]) as staging:
        nets = [load_models(args, [sources[m]], device)[0] for m in todo]
        if batched:
            results = prune_batched(args, nets, data, [splits[m] for m in todo], staging.staged, todo, log)
        else:
            results = []
            for m, net, staged in zip(todo, nets, staging.staged):
                seed_everything(model_seed(args.seed, "prune", m))
                history = []
                _, pruner, _ = prune_model(
                    args,
                    net,
                    defense,
                    settings,
                    data,
                    splits[m],
                    staged,
                    log,
                    f"model {m}",
                    memscores,
                    Progress(),
                    history,
                )
                results.append((masked_fraction(pruner.masks.values()), history))
        for m, staged, (sparsity, history) in zip(todo, staging.staged, results):
            epsilon = history[-1].get("dp_epsilon") if history else None
            mark_finished(
                staged,
                audit_plan_path(args),
                script="audit.py prune",
                model=m,
                sparsity=sparsity,
                dp_epsilon=epsilon,
                batched=batched,
                iterations=history,
                **info,
            )
        staging.publish()
    log.write(f"Total {defense.label or defense.name} defend time: {time.time() - start:.3f}s")
    log.close()


def prune_batched(args, nets, data, splits, targets, models, log) -> list:
    """prune_model's procedure for Base on a group at once: per iteration the masks of each model (Pruner), then
    one fit_ensemble over the group with each model's masks, its own optimizer kept across iterations and its
    own shuffling stream, going on from the last epoch; after the last iteration each model is at its best
    epoch, which is exported. Returns [(sparsity, history)]."""
    pruners = [Pruner(net, args.pruner_name, args.prune_sparsity, args.prune_iter, in_forward=False) for net in nets]
    optimizer = EnsembleOptimizer(args.optimizer, args.lr, args.weight_decay)  # per-model state, kept throughout
    gens = generators([model_seed(args.seed, "prune", m) for m in models], data.y.device)
    histories = [[] for _ in nets]
    schedule = pruners[0].schedule
    best = []
    for iteration in range(len(schedule)):
        for pruner in pruners:
            pruner.prune(iteration)
        best = fit_ensemble(
            nets,
            data,
            [s.train for s in splits],
            splits[0].dev,
            args.prune_epochs,
            args.batch_size,
            args.lr,
            optimizer,
            args.weight_decay,
            gens,
            masks=[p.masks for p in pruners],
            early_stop=args.early_stop,
            start_acc=0.0 if args.semantics == "release" else -1.0,
            restore_best=iteration == len(schedule) - 1,
        )
        for m, history, fit in zip(models, histories, best):
            log.write(f"model {m} iter {iteration} best model: Accuracy {fit.best_acc:.3f}")
            history.append({"accuracy": logged(fit.best_acc)})
    out = []
    for net, pruner, target, history, fit in zip(nets, pruners, targets, histories, best):
        pruner.export(target, fit.best_epoch, fit.best_acc, evaluate(net, data, splits[0].dev)[1])
        out.append((masked_fraction(pruner.masks.values()), history))
    return out


# ---------------------------------------------------------------- attack


def attack(args) -> None:
    plan, plan_sha = load_plan(args)
    if args.original:
        stage, defense_name = AUDIT_PRETRAINED, "unpruned"
        folders = require_pretrained(args, plan, plan_sha)
        settings = {}
    else:
        defense, settings = prepare_prune_args(args, plan_sha)
        stage, defense_name = stage_of(args, defense), defense.name
        stamp = None
        if defense.needs_memscore:
            stamp = models_sha256(require_pretrained(args, plan, plan_sha))
        info = prune_info(args, settings, stamp)
        folders = [audit_model_dir(args, stage, m) for m in range(plan.models)]
        flags = prune_flags_of(args)
        how = lambda groups: again(args, "prune", "--group", "G", *flags) + for_groups(groups)
        require_finished(args, folders, plan_sha, info, 8, how)
        settings = dataclasses.asdict(settings)
    attack_settings = {"rmia_gamma": args.rmia_gamma, "bootstrap": args.bootstrap, "seed": args.seed}
    stamp = models_sha256(folders)
    record_path = audit_record_path(args, stage)
    if os.path.isfile(record_path):
        old = read_json(record_path, again(args, "attack"))
        if old.get("models_sha256") == stamp and old.get("attack_settings") == attack_settings:
            print(f"Nothing to do: {record_path} holds this attack on these models")
            return
    device = pick_device(args.gpu_id)
    data = audit_data(args, plan, device)
    rows = np.concatenate([np.arange(plan.n), plan.test])
    logits = predict_ensemble(load_models(args, folders, device), data, torch.from_numpy(rows).to(device)).cpu().numpy()
    pool_logits = logits[:, : plan.n]
    test_labels = data.y[torch.from_numpy(plan.test).to(device)].cpu().numpy()
    test_acc = test_accuracy(logits[:, plan.n :], test_labels)
    scores = {
        "LiRA": lira_online_loo(pool_logits, plan.labels, plan.member),
        "RMIA": rmia_population_loo(logits, plan, test_labels, args.rmia_gamma),
    }
    subsets = {"audited": plan.audited, "all": np.arange(plan.n)}
    results = {}
    for name, s in scores.items():
        results[name] = {}
        for subset, subset_rows in subsets.items():
            found = audit_metrics(s, plan.member, subset_rows, resamples=args.bootstrap, seed=args.seed)
            outs = int((~plan.member[:, subset_rows]).sum())
            results[name][subset] = {
                "nonmembers": outs,
                "members": int(plan.member[:, subset_rows].sum()),
                **{m: [number(v) for v in found[m]] for m in METRICS},
            }
    scores_file = audit_scores_path(args, stage)
    arrays = {"rows": rows, "logits": logits.astype(np.float32), "member": plan.member, "labels": plan.labels}
    arrays.update(audited=plan.audited, test_acc=test_acc, **{f"score_{k}": v for k, v in scores.items()})
    atomic_write(scores_file, lambda f: np.savez(f, **arrays))
    epsilons = [completion_record(f).get("dp_epsilon") for f in folders]
    epsilon = epsilons[0] if epsilons and all(e == epsilons[0] for e in epsilons) else None
    log = RunLog(audit_log_path(args, stage))
    first = f"{run_name(args)} audit attack {stage} ({defense_name}): {plan.models} models"
    log.write(first)
    offset = os.path.getsize(log.path) - len((first + "\n").encode())
    log.write(
        f"Test accuracy: mean {test_acc.mean():.3f}, std {test_acc.std(ddof=1):.3f} "
        f"({test_acc.min():.3f}-{test_acc.max():.3f}) over {plan.models} models on {len(plan.test)} test rows"
    )
    if epsilon is not None:
        log.write(f"DP epsilon: {float(epsilon):.3f} (delta 1e-5)")
    for name in ATTACKS:
        for subset in SUBSETS:
            r = results[name][subset]
            for metric in METRICS:
                value, lo, hi = (float(x) for x in r[metric])
                note = "" if measurable(metric, r["nonmembers"]) else " (not measurable)"
                digits = 4 if metric == "AUC" else 3
                log.write(
                    f"{name} {subset} {metric}: {value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]{note} "
                    f"({r['members']} member and {r['nonmembers']} non-member decisions)"
                )
    log.write(f"Scores: {scores_file}")
    record = {
        "format": 1,
        "kind": "audit_attack",
        "stage": stage,
        "defense": defense_name,
        "settings": settings,
        "semantics": getattr(args, "semantics", None) if not args.original else None,
        "pruning": None
        if args.original
        else {k: getattr(args, k) for k in ("pruner_name", "prune_sparsity", "prune_iter", "prune_epochs")},
        "dp_noise": args.defend_arg if defense_name == "dp" else None,
        "dp_epsilon": None if epsilon is None else number(epsilon),
        "models": plan.models,
        "audited": plan.meta["mode"],
        "audited_rows": len(plan.audited),
        "test_acc": [number(a) for a in test_acc],
        "attacks": results,
        "attack_settings": attack_settings,
        "models_sha256": stamp,
        "plan_sha256": plan_sha,
        "scores": scores_file,
        "code": code_version(),
        "end": iso(utc_now()),
        "log": {"path": log.path, "offset": offset, "end": os.path.getsize(log.path)},
    }
    write_json(record_path, record)
    log.close()


def rmia_population_loo(logits, plan, test_labels, gamma) -> np.ndarray:
    """(M, N) RMIA scores of the pool rows, with each target's population z = the pool rows it did not train on
    and every test row (a non-member of every model): logits (M, N + T, C) on the pool rows then the test rows.
    RMIA's score is a fraction of z, so the test rows make its grid finer than the pool's half alone (on digits
    1100 z instead of 270), which matters at low FPR where tied top scores would otherwise fill the 1 %."""
    labels = np.concatenate([plan.labels, test_labels])
    member = np.concatenate([plan.member, np.zeros((plan.models, len(test_labels)), dtype=bool)], axis=1)
    return rmia_loo(logits, labels, member, gamma=gamma)[:, : plan.n]


def prune_flags_of(args) -> list:
    """The flags that name this pruned stage, for the message that says how to make it."""
    flags = ["--pruner_name", args.pruner_name, "--prune_sparsity", str(args.prune_sparsity)]
    flags += ["--prune_iter", str(args.prune_iter), "--defend", get_defense(args.defend).name]
    for flag in ("stride", "width"):
        if getattr(args, flag) is not None:
            flags += [f"--{flag}", str(getattr(args, flag))]
    if get_defense(args.defend).needs_memscore:
        flags += ["--mem_thre", str(args.mem_thre), "--weight_decay_mem", str(args.weight_decay_mem)]
    if args.semantics != "release":
        flags += ["--semantics", args.semantics]
    return flags + (["--tag", args.tag] if args.tag else [])


# ---------------------------------------------------------------- tune_dp


def wemem_records(args) -> list:
    """The attack records of the mem-score (WeMeM) defenses audited so far."""
    folder = os.path.dirname(audit_record_path(args, "x"))
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and not name.startswith(".tmp_"):
            record = read_json(os.path.join(folder, name), again(args, "attack"))
            defense = DEFENSES.get(record.get("defense"))
            if defense is not None and defense.needs_memscore:
                out.append(record)
    return out


def tune_dp(args) -> None:
    """Pick the dp noise multiplier of the utility-matched baseline on the tuning shadows (choose_noise)."""
    plan, plan_sha = load_plan(args)
    args.defend = "dp"
    if args.target_acc is None:
        found = wemem_records(args)
        if not found:
            raise MissingError(
                "tune_dp's default target is the mean test accuracy of the audited WeMeM (mem-score) defenses, and "
                "none has been attacked yet; run audit.py attack --defend slide_re ... first, or pass --target_acc A"
            )
        target = float(np.mean([np.mean([float(a) for a in r["test_acc"]]) for r in found]))
        target_from = "mean test accuracy of " + ", ".join(r["stage"] for r in found)
    else:
        target, target_from = args.target_acc, "--target_acc"
    path = audit_dp_noise_path(args)
    request = {
        "plan_sha256": plan_sha,
        "tuned_for": tuned_for(args),
        "target_acc": target,
        "noise_grid": args.noise_grid,
        "tuning_models": args.tuning_models,
        "tolerance": args.tolerance,
        "refine": args.refine,
    }
    if os.path.isfile(path):
        old = read_json(path, again(args, "tune_dp"))
        if all(json.dumps(old.get(k)) == json.dumps(v) for k, v in request.items()):
            print(f"Nothing to do: {path} holds the noise tuned for this target and these settings")
            return
    shadows = list(range(args.tuning_models))
    member = membership(args.tuning_models, plan.n, args.seed, "tuning")
    train_models(args, plan, plan_sha, shadows, member, True, "DP tuning shadow")
    device = pick_device(args.gpu_id)
    data = audit_data(args, plan, device)
    sources = pretrained_folders(args, plan, tuning=True)
    log = RunLog(audit_log_path(args, "tune_dp"))
    log.write(
        f"{run_name(args)} audit tune_dp: target test accuracy {target:.3f} ({target_from}), "
        f"{args.tuning_models} tuning shadows, noise {args.noise_grid}, tolerance {args.tolerance:g}"
    )
    tried = {}

    def trial(noise):
        if noise not in tried:
            tried[noise] = dp_trial(args, plan, data, sources, member, noise)
            acc, eps = tried[noise]
            log.write(
                f"noise {noise:g}: mean test accuracy {np.mean(acc):.3f} "
                f"({', '.join(f'{a:.3f}' for a in acc)}), epsilon {eps:.3f}"
            )
        return float(np.mean(tried[noise][0]))

    for noise in args.noise_grid:
        trial(noise)
    for _ in range(args.refine):  # bisect (in log noise) towards the privacy edge of the tolerance band
        between = refine_between({s: trial(s) for s in tried}, target, args.tolerance)
        if between is None:
            break
        trial(float(f"{math.sqrt(between[0] * between[1]):.4g}"))
    noise, within = choose_noise({s: trial(s) for s in tried}, target, args.tolerance)
    gap = trial(noise) - target
    log.write(
        f"Chosen noise {noise:g}: mean test accuracy {trial(noise):.3f}, {gap:+.3f} from the target "
        + (
            "(the largest noise within tolerance)"
            if within
            else f"(NOT within the tolerance {args.tolerance:g}: the closest; widen --noise)"
        )
    )
    record = {
        **request,
        "target_from": target_from,
        "noise": noise,
        "mean_acc": trial(noise),
        "within_tolerance": within,
        "tried": [
            {"noise": s, "test_acc": list(map(float, a)), "epsilon": number(e)} for s, (a, e) in sorted(tried.items())
        ],
    }
    write_json(path, record)
    log.write(f"Wrote {path}")
    log.close()


def choose_noise(accuracy: dict, target: float, tolerance: float) -> tuple:
    """(noise, within): the LARGEST noise multiplier whose mean tuning accuracy (accuracy: noise -> mean %) is
    within tolerance of the target, the most private DP-SGD at the defenses' utility (the fair baseline of
    Aerni et al.); when none is, the one closest to the target (ties: the larger noise), within False."""
    accepted = [s for s, acc in accuracy.items() if abs(acc - target) <= tolerance]
    if accepted:
        return max(accepted), True
    return min(accuracy, key=lambda s: (abs(accuracy[s] - target), -s)), False


def refine_between(accuracy: dict, target: float, tolerance: float):
    """The two tried noises to bisect next, or None: the largest accepted noise and the next larger one tried
    (not accepted), so the search moves the choice towards more noise; with none accepted yet, the first pair
    of neighbours whose accuracies bracket the target."""
    grid = sorted(accuracy)
    ok = [s for s in grid if abs(accuracy[s] - target) <= tolerance]
    if ok:
        above = [s for s in grid if s > max(ok)]
        return (max(ok), above[0]) if above else None
    pairs = [(a, b) for a, b in zip(grid, grid[1:]) if (accuracy[a] - target) * (accuracy[b] - target) < 0]
    return pairs[0] if pairs else None


def dp_trial(args, plan, data, sources, member, noise) -> tuple:
    """Prune every tuning shadow under dp at this noise; (test accuracies of their best models, epsilon)."""
    trial_args = argparse.Namespace(**vars(args))
    trial_args.defend_arg = noise
    force_defense_flags(trial_args)
    defense, settings = get_defense("dp"), DefenseSettings.from_args(trial_args)
    defense.check_args(settings)
    accs, epsilon = [], float("nan")
    device = data.y.device
    with tempfile.TemporaryDirectory(dir=audit_dir(args), prefix=".tmp_tune_dp") as scratch:
        for j, source in enumerate(sources):
            seed_everything(model_seed(args.seed, "prune", TUNING_OFFSET + j))
            net = load_models(args, [source], device)[0]
            target = os.path.join(scratch, f"model_{j}")
            os.makedirs(target)
            history = []
            split = model_split(plan, member[j], device)
            prune_model(
                trial_args,
                net,
                defense,
                settings,
                data,
                split,
                target,
                NullLog(),
                f"tuning {j}",
                None,
                Progress(),
                history,
            )
            best = load_model(args, checkpoint(target), device, "tuning checkpoint", "rerun tune_dp")[0]
            accs.append(evaluate(best, data, split.test)[0])
            epsilon = float(history[-1]["dp_epsilon"])
    return accs, epsilon


# ---------------------------------------------------------------- summarize


def summarize(args) -> None:
    """audit.csv (one row per attacked stage: defense and setting), the privacy-utility figure and the mem-score
    decile tables, from the attack records and their scores files; files that would not change are left alone."""
    folder = os.path.dirname(audit_record_path(args, "x"))
    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and not name.startswith(".tmp_"):
            records.append(read_json(os.path.join(folder, name), again(args, "attack")))
    if not records:
        raise MissingError(f"no audit attack records under {folder}; {again(args, 'attack', '--original')}")
    out = args.out or audit_dir(args)
    os.makedirs(out, exist_ok=True)
    table = audit_report.audit_table(records)
    changed = write_if_changed(os.path.join(out, AUDIT_CSV), table.to_csv(index=False).encode())
    plane = audit_report.draw_plane(table)
    changed |= write_if_changed(os.path.join(out, AUDIT_PLANE), audit_report.png_bytes(plane))
    plan, _ = load_plan(args)
    path = audit_memscore_path(args)
    estimate = read_memscores(path, plan.n, again(args, "memscore")).numpy() if os.path.isfile(path) else None
    panels = []
    for record in audit_report.ordered(records):
        with np.load(record["scores"], allow_pickle=False) as z:
            for attack_name in ATTACKS:
                if estimate is not None:
                    rows = decile_table(z[f"score_{attack_name}"], z["member"], estimate)
                    panels.append((audit_report.row_label(record), attack_name, rows))
    text = audit_report.deciles_markdown(panels, plan)
    changed |= write_if_changed(os.path.join(out, AUDIT_DECILES), text.encode())
    print(audit_report.markdown_table(table))
    print(("Wrote" if changed else "Nothing to do: unchanged") + f" {out}/{AUDIT_CSV}, {AUDIT_PLANE}, {AUDIT_DECILES}")


# ---------------------------------------------------------------- steps in order

AuditStep = namedtuple("AuditStep", "name argv needs")
DEFENSE_FLAGS = ("defend_arg", "stride", "width", "weight_decay_mem", "mem_thre", "dp_microbatch", "semantics", "tag")


def parse_defense(spec: str) -> dict:
    """'slide_re:stride=1,width=5' -> {'defend': 'slide_re', 'stride': '1', 'width': '5'}."""
    name, _, rest = spec.partition(":")
    entry = {"defend": get_defense(name.strip()).name}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in DEFENSE_FLAGS:
            raise UsageError(f"--defense {spec}: '{item}' is not flag=value with a flag of {', '.join(DEFENSE_FLAGS)}")
        entry[key] = value
    return entry


def audit_steps(
    config,
    gpu="GPU-ID",
    models=32,
    group_size=8,
    audited=(),
    defenses=({"defend": "base"},),
    pruning=(),
    with_dp=False,
    dp=(),
    attack=(),
    common=(),
    out=None,
) -> list:
    """Every step's argv (after "python") in dependency order, each with the names of the steps it needs:
    prepare; pretrain per group; memscore; attack --original; per defense entry ({defend, flag: value}) prune per
    group and its attack; with_dp: tune_dp (after the defenses' attacks: its default target is their accuracy),
    prune dp per group, attack dp; summarize. audited: prepare's flags (--canaries K ...); pruning: the pruning
    flags of every prune, attack and tune_dp; dp: tune_dp's own (--target_acc, --noise ...); attack: the attack
    flags; common: flags of every step (--seed, --audit_tag, config overrides, --quiet)."""
    common, pruning = list(common), list(pruning)
    groups = range(-(-models // group_size))
    step = lambda name, *flags: ["audit.py", name, gpu, config, *flags, *common]
    by_group = lambda g: ["--group", str(g), "--group_size", str(group_size)]
    steps = [AuditStep("prepare", step("prepare", "--models", str(models), *audited), [])]
    pretrain_steps = [AuditStep(f"pretrain.g{g}", step("pretrain", *by_group(g)), ["prepare"]) for g in groups]
    steps += pretrain_steps
    pretrained = [s.name for s in pretrain_steps]
    steps.append(AuditStep("memscore", step("memscore"), pretrained))
    steps.append(AuditStep("attack.unpruned", step("attack", "--original", *attack), pretrained))
    entries = [dict(e) for e in defenses]
    defense_attacks = []

    def add(entry, name, extra_needs):
        flags = [f for k, v in entry.items() for f in (f"--{k}", str(v))]
        prunes = [
            AuditStep(f"prune.{name}.g{g}", step("prune", *by_group(g), *pruning, *flags), ["memscore", *extra_needs])
            for g in groups
        ]
        attack_step = AuditStep(f"attack.{name}", step("attack", *pruning, *flags, *attack), [p.name for p in prunes])
        steps.extend(prunes + [attack_step])
        return attack_step.name

    for i, entry in enumerate(entries):
        label = "_".join([entry["defend"]] + [f"{k}{v}" for k, v in entry.items() if k != "defend"])
        defense_attacks.append(add(entry, f"{i}.{label}", []))
    if with_dp:
        dp_semantics = ["--semantics", "corrected"]
        steps.append(AuditStep("tune_dp", step("tune_dp", *pruning, *dp_semantics, *dp), defense_attacks))
        add({"defend": "dp", "semantics": "corrected"}, "dp", ["tune_dp"])
    summary = step("summarize") + (["--out", out] if out else [])
    steps.append(AuditStep("summarize", summary, [s.name for s in steps if s.name.startswith("attack.")]))
    return steps


def run_all(args) -> None:
    """Every step of audit_steps() in order, in this process."""
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
    dp = [
        f
        for k in ("target_acc", "noise", "tuning_models", "tolerance", "refine")
        if k in explicit
        for f in flag_value(k)
    ]
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
        dp,
        attack_flags,
        common,
        args.out,
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
    "tune_dp": tune_dp,
    "summarize": summarize,
    "all": run_all,
}


def main(argv=None) -> None:
    args = get_args(argv)
    RUNNERS[args.step](args)


if __name__ == "__main__":
    main_guard(main)
