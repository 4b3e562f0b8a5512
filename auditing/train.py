"""The audit's training steps (audit.py prepare, pretrain, memscore, prune): the plan, the M models pretrained
and pruned group by group (Base as one batched ensemble), and the audit's own mem-scores."""

import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from auditing.ensemble import EnsembleOptimizer, fit_ensemble, predict_ensemble
from auditing.plan import TUNING_OFFSET, Plan, default_canaries, feldman_memscores, model_seed
from auditing.shared import (
    audit_data,
    build_models,
    check_other_settings,
    finished,
    generators,
    group_models,
    load_models,
    memscore_current,
    model_split,
    models_sha256,
    pretrain_info,
    prune_info,
    read_audit_memscores,
    require_pretrained,
)
from auto_settings import derive
from common import (
    RunLog,
    UsageError,
    pick_device,
    seed_everything,
)
from datasets import get_dataset
from intervals import FPR_TARGETS, measurable
from memscores import fingerprint, train_sha256, write_with_sidecar
from paths import (
    AUDIT_PRETRAINED,
    checkpoint,
    memscore_path,
)
from progress import Progress
from prune_modi import forced_line, prune_model
from pruning import (
    Pruner,
    masked_fraction,
)
from records import logged
from train import (
    Staging,
    evaluate,
    mark_finished,
    save_checkpoint,
)


def prepare(audit) -> None:
    args = audit.flags
    path = audit.plan_path
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
        plan = Plan.load(path, audit.command("prepare"))
        if plan.meta.get("options") != json.dumps(options, sort_keys=True):
            raise UsageError(
                f"the audit plan {path} exists with other options ({plan.meta.get('options')}); delete "
                f"{audit.folder} to start another audit, or pass --audit_tag T for one beside it"
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
    log = RunLog(audit.log_path("plan"))
    outs = int((~plan.member[:, plan.audited]).sum())
    what = (
        f"{k} canaries"
        if plan.meta["mode"] == "canaries"
        else f"the {k} top mem-score rows of {memscore_path(args.dataset_name, args.model_name)}"
    )
    log.write(f"{audit.run} audit plan: {args.models} models, each on {n // 2} of {n} pool rows; audited: {what}")
    log.write(f"Dev rows {len(plan.dev)}, test rows {len(plan.test)} (the test set cut 34/66)")
    for metric, fpr in FPR_TARGETS.items():
        ok = "measurable" if measurable(metric, outs) else f"not measurable (needs {math.ceil(10 / fpr)})"
        log.write(f"Audited non-member decisions: {outs}; {metric} {ok}")
    log.write(f"Wrote {path}")
    log.close()


def pretrain(audit) -> None:
    plan = audit.plan[0]
    group = group_models(audit, plan.models)
    train_models(audit, group, plan.member, False, f"group {audit.flags.group}")


def unfinished(audit, models, tuning) -> list:
    """The listed pretrained models (audited or tuning) not finished under this plan and these settings."""
    info, plan_sha = pretrain_info(audit), audit.plan[1]
    return [m for m in models if not finished(audit.model_dir(AUDIT_PRETRAINED, m, tuning), plan_sha, info)]


def train_models(audit, models, member, tuning, what) -> None:
    """Pretrain the listed models (audited or tuning shadows) as one batched ensemble; skip finished ones."""
    args, (plan, plan_sha) = audit.flags, audit.plan
    info = pretrain_info(audit)
    folders = {m: audit.model_dir(AUDIT_PRETRAINED, m, tuning) for m in models}
    todo = unfinished(audit, models, tuning)
    check_other_settings([folders[m] for m in todo], plan_sha, info, f"delete {audit.folder} to start again")
    if not todo:
        print(f"Nothing to do: the {what} models are pretrained")
        return
    device = pick_device(args.gpu_id)
    data = audit_data(audit, plan, device)
    offset = TUNING_OFFSET if tuning else 0
    splits = {m: model_split(plan, member[m], device) for m in todo}
    nets = build_models(audit, [model_seed(args.seed, "init", offset + m) for m in todo], device)
    gens = generators([model_seed(args.seed, "shuffle", offset + m) for m in todo], device)
    # a group's own log: groups run in parallel, and a RunLog holds its file from the first line to the last
    name = "tuning_pretrained" if tuning else f"{AUDIT_PRETRAINED}.group{args.group}"
    log = RunLog(audit.log_path(name))
    log.write(f"{audit.run} audit pretrain {what}: models {todo[0]}..{todo[-1]}, epochs {args.epochs}")
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
            mark_finished(staged, audit.plan_path, script="audit.py pretrain", model=m, epoch=epoch, **info)
            log.write(
                f"model {m}: epoch {epoch}, dev Accuracy {dev_acc:.3f}, test Accuracy {test_acc:.3f}, "
                f"Loss {test_loss:.3f}"
            )
        staging.publish()
    log.write(f"Total pretrain time: {time.time() - start:.3f}s")
    log.close()


def memscore(audit) -> None:
    """Feldman's mem-scores of the pool (training labels, canaries included) from the M pretrained models, in the
    mem-score CSV format with its fingerprint (memscores.py), which the audit's defenses read."""
    args, plan = audit.flags, audit.plan[0]
    folders = require_pretrained(audit)
    stamp = models_sha256(folders)
    path = audit.memscore_path
    if memscore_current(path, stamp):
        print(f"Nothing to do: {path} holds the mem-scores of these pretrained models")
        return
    device = pick_device(args.gpu_id)
    data = audit_data(audit, plan, device)
    pool = torch.arange(plan.n, device=device)
    logits = predict_ensemble(load_models(audit, folders, device), data, pool).cpu().numpy()
    correct = logits.argmax(2) == plan.labels[None]
    scores, lacking = feldman_memscores(correct, plan.member)
    fields = fingerprint(args.dataset_name, args.model_name, data.x[: plan.n], data.y[: plan.n], memscore_source(plan))
    write_with_sidecar(path, pd.DataFrame(scores).to_csv().encode(), {**fields, "models_sha256": stamp})
    log = RunLog(audit.log_path("memscore"))
    log.write(f"{audit.run} audit mem-scores of {plan.n} pool rows from {plan.models} pretrained models")
    log.write(
        f"Mean {scores.mean():.3f}, {int((scores >= 0.5).sum())} rows >= 0.5; audited rows: mean "
        f"{scores[plan.audited].mean():.3f}; rows without an IN or an OUT model (score 0): {lacking}"
    )
    log.write(f"Wrote {path}")
    log.close()


def memscore_source(plan) -> str:
    return f"audit plan ({plan.meta['mode']}, {len(plan.audited)} audited rows, seed {plan.meta['seed']})"


def prune(audit) -> None:
    args, (plan, plan_sha) = audit.flags, audit.plan
    defense, settings, stage = audit.defense, audit.defense_settings, audit.stage
    group = group_models(audit, plan.models)
    device = pick_device(args.gpu_id)
    data = audit_data(audit, plan, device)
    memscores, stamp = read_audit_memscores(audit, data) if defense.needs_memscore else (None, None)
    # a setting given as auto: one value for every model and group, from model 0's training set (no victim here)
    model0 = data.y[model_split(plan, plan.member[0], device).train]
    resolved, auto_line = derive(defense.auto_flags(args), model0, memscores, "model 0's training set")
    settings = replace(settings, **resolved)
    info = prune_info(audit, settings, stamp)
    folders = {m: audit.model_dir(stage, m) for m in group}
    todo = [m for m in group if not finished(folders[m], plan_sha, info)]
    check_other_settings([folders[m] for m in todo], plan_sha, info, "pass --tag T to keep both settings")
    if not todo:
        print(f"Nothing to do: group {args.group} of {stage} is pruned")
        return
    sources = require_pretrained(audit)
    if memscores is not None:
        defense.check_memscores(memscores, settings, audit.memscore_path)
    splits = {m: model_split(plan, plan.member[m], device) for m in todo}
    log = RunLog(audit.log_path(f"{stage}.group{args.group}"))  # its own: groups run in parallel
    log.write(f"{audit.run} audit prune {stage} group {args.group}: models {todo[0]}..{todo[-1]}")
    log.write(f"Semantics: {args.semantics}")
    if forced_line(args, defense):
        log.write(forced_line(args, defense))
    if auto_line:
        log.write(auto_line)
    first = splits[todo[0]].train
    scores = None if memscores is None else memscores[first.cpu()]
    for line in defense.header_lines(settings, data.y[first], scores, memscores):
        log.write(line)
    batched = defense.name == "base" and not args.sequential
    start = time.time()
    with Staging([folders[m] for m in todo]) as staging:
        nets = [load_models(audit, [sources[m]], device)[0] for m in todo]
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
                audit.plan_path,
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
