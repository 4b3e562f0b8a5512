"""audit.py tune: a defense's setting chosen on tuning models, by one rule for every defense (docs/audit.md).

K tuning models (--tuning_models, 16) train on halves of the pool drawn for them alone (membership stream
"tuning", model seeds from TUNING_OFFSET): the tuner never opens an audited model or uses an audited draw. Their
mem-scores are Feldman's estimate over the K tuning models, not the audit's. A trial prunes every tuning model
under one setting from the defense's search space (its class's `search_space`, search_space.py) and scores it on two
objectives: the mean accuracy on the dev rows (the audit's table reports the test rows) and the leave-one-out
LiRA leakage on the audited rows among the K tuning models, the audit's own attack: its TPR at 1 % FPR where the
tuning models make the 1000 non-member decisions that it needs (intervals.measurable), else its AUC. The trials share an
Optuna study (tuning.open_study): with --worker K/W, W processes or grid steps run their shares of the trials on
one study, each with a log of its own and no chosen setting; `tune` without --worker then chooses (it runs no
trial when the study holds --trials complete ones). The Base reference (the
tuning models pruned without a defense) sets the default target, its mean dev accuracy minus 1 point; the chosen
setting is tuning.choose's, written to tuning/<stage>.json with its values in the knobs' units (a share of the
smallest class, a quantile of the mem-scores), so an audited run resolves them on its own data.
"""

import argparse
import dataclasses
import json
import os

import numpy as np
import torch

from auditing.ensemble import predict_ensemble
from auditing.loo_attacks import LIRA_MIN_MODELS, audit_metrics, lira_online_loo
from auditing.plan import broken_file, feldman_memscores, membership
from auditing.settings import defense_settings
from auditing.shared import (
    audit_data,
    load_json,
    load_models,
    model_split,
    pretrained_folders,
    prune_tuning_models,
    read_audit_memscores,
    read_json,
    write_json,
)
from auditing.train import train_models, unfinished
from auditing.tuning import choose, completed, open_study, run_trials
from common import MissingError, RunLog, UsageError, pick_device
from defenses import get_defense
from intervals import measurable
from search_space import QUANTILE, flags_of
from train import evaluate

TUNE_MODELS = 16  # tuning models: about 8 IN and 8 OUT references for each audited row's leave-one-out score
TRIALS = 12
LOW_FPR = "TPR@1%FPR"  # the leakage objective, where the tuning models give it enough non-member decisions


def tune(audit) -> None:
    """Run the defense's trials until its study holds --trials complete ones, then choose its setting. With
    --defend base (nothing to search): pretrain the tuning models and measure the Base reference only, the step
    that a grid runs once before the defenses' tune steps, so that no two of them write these files."""
    args, defense = audit.flags, audit.defense
    if args.tuning_models < LIRA_MIN_MODELS:
        raise UsageError(f"--tuning_models must be >= {LIRA_MIN_MODELS} (leave-one-out LiRA), got {args.tuning_models}")
    worker, alone = args.worker, args.worker.w == 1
    if not defense.search_space and not alone:
        raise UsageError(f"--worker runs a defense's trials; --defend {defense.name} has no search space")
    plan, plan_sha = audit.plan
    member = membership(args.tuning_models, plan.n, args.seed, "tuning")
    models = list(range(args.tuning_models))
    if not alone and unfinished(audit, models, True):  # W workers would each train them
        base = audit.command("tune", "--defend", "base", *schedule_flags(audit), "--tuning_models", str(len(models)))
        raise MissingError(
            f"--worker {worker.slot} runs trials on the tuning models, which are not all pretrained; run {base} first"
        )
    train_models(audit, models, member, True, "tuning")
    device = pick_device(args.gpu_id)
    data = audit_data(audit, plan, device)
    tuning = Tuning(audit, data, member, device)
    reference = tuning.base_reference(plan_sha) if alone else None  # the chooser's: one writer
    if not defense.search_space:
        print(
            f"Base reference on the tuning models: dev accuracy {reference['acc']:.3f}, LiRA {tuning.leak_metric} "
            f"{reference['leak']:.3f}"
        )
        return
    stage = study_name(audit, defense)
    where = args.study or audit.path("tuning", f"{stage}.journal")
    study = open_study(stage, where, args.seed, worker)
    ties = {"plan_sha256": plan_sha, "run": audit.run, "tuned_for": audit.tuned_for}
    if not study.user_attrs:
        for key, value in ties.items():
            study.set_user_attr(key, value)
    for key, value in ties.items():
        if json.dumps(study.user_attrs.get(key)) != json.dumps(value):
            raise UsageError(
                f"the study {stage} in {where} holds trials of another {key.replace('_', ' ')}; pass another "
                f"--study, or delete it to start again"
            )
    log = RunLog(audit.log_path(f"tune_{stage}" + ("" if alone else f".w{worker.k}of{worker.w}")))
    log.write(
        f"{audit.run} audit tune {defense.name}: {args.trials} trials on {args.tuning_models} tuning models, "
        f"study {stage} in {where}" + ("" if alone else f"; worker {worker.slot}: {worker.share(args.trials)} of them")
    )
    log.write(f"Leakage: LiRA {tuning.leak_metric} on the audited rows ({tuning.nonmembers} non-member decisions)")
    if alone:
        log.write(
            f"Base reference: dev accuracy {reference['acc']:.3f}, LiRA {tuning.leak_metric} {reference['leak']:.3f}"
        )

    def evaluate_setting(values):
        flags = flags_of(defense.search_space, values, tuning.class_sizes, tuning.memscores.numpy())
        acc, leak = tuning.trial(defense, flags)
        log.write(f"trial {describe(values, flags)}: dev accuracy {acc:.3f}, LiRA {tuning.leak_metric} {leak:.3f}")
        return acc, leak

    ran = run_trials(study, args.trials, defense.search_space, evaluate_setting, worker)
    if not alone:  # the choice is tune's without --worker, after every worker: one writer of tuning/<stage>.json
        log.write(f"Worker {worker.slot} ran {ran} trials; the study holds {len(completed(study))} complete")
        log.close()
        return
    points = [
        {"number": t.number, "acc": t.values[0], "leak": t.values[1], "values": dict(t.params)}
        for t in completed(study)
    ]
    target = reference["acc"] - 1.0 if args.target_acc is None else args.target_acc
    chosen, within = choose(points, target, args.tolerance)
    flags = flags_of(defense.search_space, chosen["values"], tuning.class_sizes, tuning.memscores.numpy())
    result = {
        "defense": defense.name,
        "stage": stage,
        "plan_sha256": plan_sha,
        "tuned_for": audit.tuned_for,
        "study": where,
        "tuning_models": args.tuning_models,
        "leak_metric": tuning.leak_metric,
        "reference": reference,
        "target_acc": target,
        "target_from": "the Base-pruned tuning models' mean dev accuracy - 1"
        if args.target_acc is None
        else "--target_acc",
        "tolerance": args.tolerance,
        "chosen": {**chosen, "flags": flags},
        "within_tolerance": within,
        "trials": points,
    }
    path = audit.path("tuning", f"{stage}.json")
    write_json(path, result)
    log.write(
        f"Chosen: trial {chosen['number']}, {describe(chosen['values'], flags)}: dev accuracy {chosen['acc']:.3f}, "
        f"LiRA {tuning.leak_metric} {chosen['leak']:.3f}; target {target:.3f} - {args.tolerance:g} "
        + ("reached" if within else "NOT reached: the most accurate of the front")
    )
    log.write(f"Wrote {path}")
    log.close()


def apply_tuned(audit):
    """--tuned: audit with the defense's searched flags set to the setting `tune` chose for this plan and pruning
    schedule, resolved on this audit's data (as `auto` is: the class sizes of model 0's training set, the audit's
    mem-scores), the stage named with --tag tuned unless a tag is given, and tuned_from. audit.py calls it once,
    before it resolves the defense."""
    args = audit.flags
    defense = get_defense(args.defend)
    plan, plan_sha = audit.plan
    path = audit.path("tuning", f"{study_name(audit, defense)}.json")
    how = audit.command(
        "tune", "--defend", defense.name, *schedule_flags(audit), "--tuning_models", str(args.tuning_models)
    )
    if not os.path.isfile(path):
        raise MissingError(
            f"--tuned: no setting has been chosen for {defense.name} ({path} not found); run {how} first"
        )
    chosen = read_json(path, "the chosen setting", f"rebuild it with: {how}")
    keys = ("leak_metric", "reference", "target_acc", "tolerance", "chosen", "within_tolerance", "trials")
    if any(k not in chosen for k in keys) or "values" not in chosen["chosen"]:
        raise broken_file(path, "the chosen setting", "not the file tune writes", f"rebuild it with: {how}")
    if chosen.get("plan_sha256") != plan_sha:
        raise MissingError(f"--tuned: {path} was tuned for another audit plan; run {how} again")
    if json.dumps(chosen.get("tuned_for", audit.tuned_for)) != json.dumps(audit.tuned_for):
        raise MissingError(f"--tuned: {path} was tuned with other pruning or training settings; run {how} again")
    class_sizes = [c for c in np.bincount(plan.labels[: plan.n][plan.member[0]]) if c]
    scores = None
    if any(k.unit == QUANTILE for k in defense.search_space):
        data = audit_data(audit, plan, torch.device("cpu"))
        scores = read_audit_memscores(audit, data)[0].numpy()
    for flag, value in flags_of(defense.search_space, chosen["chosen"]["values"], class_sizes, scores).items():
        setattr(args, flag, value)
    args.tag = args.tag or "tuned"
    return dataclasses.replace(audit, tuned_from={"file": path, **{k: chosen[k] for k in keys}})  # for the plane


def schedule_flags(audit) -> list:
    schedule = audit.schedule
    return [
        f for k in ("pruner_name", "prune_sparsity", "prune_iter", "prune_epochs") for f in (f"--{k}", str(schedule[k]))
    ]


def study_name(audit, defense) -> str:
    """The pruned stage's name with what else changes a trial's numbers: the schedule (iterations, epochs) and
    the number of tuning models."""
    s = audit.schedule
    stage = defense.prefix(s["pruner_name"], s["prune_sparsity"], None, s["semantics"])
    return f"{stage}_i{s['prune_iter']}e{s['prune_epochs']}_k{audit.flags.tuning_models}"


def describe(values: dict, flags: dict) -> str:
    return ", ".join(
        f"{flag} {flags[flag]:g}" + ("" if values[flag] == flags[flag] else f" ({values[flag]:.3g})") for flag in flags
    )


class Tuning:
    """The tuning models of a plan, their data and mem-scores, and one trial: prune all of them under a setting,
    then (mean dev accuracy, LiRA TPR@1%FPR on the audited rows among them)."""

    def __init__(self, audit, data, member, device):
        plan = audit.plan[0]
        self.audit, self.plan, self.data, self.member, self.device = audit, plan, data, member, device
        self.sources = pretrained_folders(audit, self.plan, tuning=True)
        self.splits = [model_split(plan, member[j], device) for j in range(len(member))]
        self.class_sizes = torch.bincount(data.y[self.splits[0].train]).tolist()  # as audit prune: model 0's
        self.class_sizes = [c for c in self.class_sizes if c]
        self.memscores = self.estimate_memscores()
        self.nonmembers = int((~member[:, plan.audited]).sum())
        self.leak_metric = LOW_FPR if measurable(LOW_FPR, self.nonmembers) else "AUC"

    def estimate_memscores(self) -> torch.Tensor:
        pool = torch.arange(self.plan.n, device=self.device)
        logits = predict_ensemble(load_models(self.audit, self.sources, self.device), self.data, pool)
        correct = (logits.argmax(-1) == self.data.y[pool]).cpu().numpy()
        return torch.from_numpy(feldman_memscores(correct, self.member)[0])

    def base_reference(self, plan_sha) -> dict:
        """The tuning models pruned under Base: {"acc", "leak"}, computed once per plan and pruning schedule."""
        request = {"plan_sha256": plan_sha, "tuning_models": len(self.member), "schedule": self.audit.schedule}
        name = f"base_{study_name(self.audit, get_defense('base'))}_{self.audit.flags.semantics}.json"
        path = self.audit.path("tuning", name)
        old = load_json(path)[0] if os.path.isfile(path) else None
        if old and all(json.dumps(old.get(k)) == json.dumps(v) for k, v in request.items()):
            return {"acc": old["acc"], "leak": old["leak"]}
        acc, leak = self.trial(get_defense("base"), {})
        write_json(path, {**request, "acc": acc, "leak": leak})
        return {"acc": acc, "leak": leak}

    def trial(self, defense, flags: dict) -> tuple:
        args = argparse.Namespace(**vars(self.audit.flags))  # the trial's flags
        args.defend = defense.name
        for flag, value in flags.items():  # flags_of's: whole samples for the window, numbers otherwise
            setattr(args, flag, value)
        settings = defense_settings(args, defense)
        memscores = self.memscores.to(self.device) if defense.needs_memscore else None
        if memscores is not None:
            defense.check_memscores(memscores, settings, "the tuning models' mem-scores")
        accs, logits = [], []
        pool = torch.arange(self.plan.n, device=self.device)
        for j, best, _ in prune_tuning_models(
            self.audit, args, defense, settings, self.data, self.sources, self.splits, memscores, "tune"
        ):
            accs.append(evaluate(best, self.data, self.splits[j].dev)[0])
            logits.append(predict_ensemble([best], self.data, pool)[0].cpu().numpy())
        scores = lira_online_loo(np.stack(logits), self.plan.labels, self.member)
        leak = audit_metrics(scores, self.member, self.plan.audited, resamples=0)[self.leak_metric][0]
        return float(np.mean(accs)), float(leak)
