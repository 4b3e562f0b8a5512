"""The audit's attack and summarize steps (audit.py attack, summarize): leave-one-out LiRA and RMIA pooled
over the M models of a stage, its attack record and scores, and audit.csv with its figure and decile tables."""

import dataclasses
import math
import os
import sys

import numpy as np
import pandas as pd
import torch

from auditing import report as audit_report
from auditing.ensemble import predict_ensemble
from auditing.loo_attacks import (
    audit_metrics,
    decile_table,
    lira_online_loo,
    paired_difference,
    rmia_loo,
    unscored_pairs,
)
from auditing.shared import (
    attack_stale,
    audit_data,
    check_memscore_files,
    for_groups,
    load_models,
    models_sha256,
    prune_flags_of,
    prune_info,
    read_attack_records,
    read_scores,
    require_finished,
    require_pretrained,
    test_accuracy,
    write_if_changed,
    write_json,
)
from common import (
    MissingError,
    RunLog,
    atomic_write,
    pick_device,
)
from intervals import FPR_TARGETS, measurable
from memscores import read_memscores
from paths import (
    AUDIT_COMPARE,
    AUDIT_CSV,
    AUDIT_DECILES,
    AUDIT_MD,
    AUDIT_PLANE,
    AUDIT_PRETRAINED,
)
from records import code_version, iso, number, utc_now
from train import (
    completion_record,
    file_sha256,
)

ATTACKS = ("LiRA", "RMIA")


SUBSETS = ("audited", "all")  # the audited rows (canaries or top mem-score rows) and every pool row


METRICS = ("AUC",) + tuple(FPR_TARGETS)


def attack(audit) -> None:
    args, (plan, plan_sha) = audit.flags, audit.plan
    if args.original:
        stage, defense_name = AUDIT_PRETRAINED, "unpruned"
        folders = require_pretrained(audit)
        settings = {}
    else:
        stage, defense_name = audit.stage, audit.defense.name
        stamp = None
        if audit.defense.needs_memscore:
            stamp = models_sha256(require_pretrained(audit))
        info = prune_info(audit, audit.defense_settings, stamp)
        folders = [audit.model_dir(stage, m) for m in range(plan.models)]
        flags = prune_flags_of(audit)
        how = lambda groups: audit.again("prune", "--group", "G", *flags) + for_groups(groups)
        require_finished(folders, plan_sha, info, 8, how)
        settings = dataclasses.asdict(audit.defense_settings)
    attack_settings = {"rmia_gamma": args.rmia_gamma, "bootstrap": args.bootstrap, "seed": args.seed}
    stamp = models_sha256(folders)
    record_path = audit.record_path(stage)
    if os.path.isfile(record_path):
        stale = attack_stale(record_path, stamp, attack_settings)
        if stale is None:
            print(f"Nothing to do: {record_path} holds this attack on these models")
            return
        print(f"Attacking {stage} again: {stale}")
    warn_unscored(plan)
    device = pick_device(args.gpu_id)
    data = audit_data(audit, plan, device)
    rows = np.concatenate([np.arange(plan.n), plan.test])
    on_device = torch.from_numpy(rows).to(device)
    logits = predict_ensemble(load_models(audit, folders, device), data, on_device).cpu().numpy()
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
    scores_file = audit.scores_path(stage)
    arrays = {"rows": rows, "logits": logits.astype(np.float32), "member": plan.member, "labels": plan.labels}
    arrays.update(audited=plan.audited, test_acc=test_acc, **{f"score_{k}": v for k, v in scores.items()})
    atomic_write(scores_file, lambda f: np.savez(f, **arrays))
    epsilons = [completion_record(f).get("dp_epsilon") for f in folders] if defense_name == "dp" else []
    log = RunLog(audit.log_path(stage))
    first = f"{audit.run} audit attack {stage} ({defense_name}): {plan.models} models"
    log.write(first)
    offset = os.path.getsize(log.path) - len((first + "\n").encode())
    log.write(
        f"Test accuracy: mean {test_acc.mean():.3f}, std {test_acc.std(ddof=1):.3f} "
        f"({test_acc.min():.3f}-{test_acc.max():.3f}) over {plan.models} models on {len(plan.test)} test rows"
    )
    if epsilons:
        low, middle, high = epsilon_range(epsilons)
        log.write(
            f"DP epsilon over the {len(epsilons)} models: median {middle:.3f} ({low:.3f}-{high:.3f}), delta 1e-5; "
            "the DP-SGD fine-tuning's only, not the non-private pretraining's on the same rows"
        )
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
        "tuned": audit.tuned_from,
        "dp_epsilons": [None if e is None else number(e) for e in epsilons] if epsilons else None,
        "models": plan.models,
        "audited": plan.meta["mode"],
        "audited_rows": len(plan.audited),
        "test_acc": [number(a) for a in test_acc],
        "attacks": results,
        "attack_settings": attack_settings,
        "models_sha256": stamp,
        "plan_sha256": plan_sha,
        "scores": scores_file,
        "scores_sha256": file_sha256(scores_file),
        "flags": args.argv[2:],
        "code": code_version(),
        "end": iso(utc_now()),
        "log": {"path": log.path, "offset": offset, "end": os.path.getsize(log.path)},
    }
    write_json(record_path, record)
    log.close()


def warn_unscored(plan) -> None:
    """A plan with too few models (made before audit.py refused them) leaves (row, target) pairs that LiRA scores
    0 whatever the models do: say how many."""
    unscored = unscored_pairs(plan.member)
    if unscored:
        print(
            f"warning: {unscored}/{plan.member.size} (row, target) pairs have no IN or no OUT reference among the "
            f"other {plan.models - 1} models, and LiRA scores them 0 (no information); prepare an audit with more "
            f"--models (about 2^-(M-2) of the pairs lack one)",
            file=sys.stderr,
        )


def epsilon_range(epsilons) -> tuple:
    """(min, median, max) of the models' DP epsilons (numbers or records.number's strings; None reads nan)."""
    values = np.array([math.nan if e is None else float(e) for e in epsilons])
    return float(values.min()), float(np.median(values)), float(values.max())


def rmia_population_loo(logits, plan, test_labels, gamma) -> np.ndarray:
    """(M, N) RMIA scores of the pool rows, with each target's population z = the pool rows it did not train on
    and every test row (a non-member of every model): logits (M, N + T, C) on the pool rows then the test rows.
    RMIA's score is a fraction of z, so the test rows make its grid finer than the pool's half alone (on digits
    1100 z instead of 270), which matters at low FPR where tied top scores would otherwise fill the 1 %."""
    labels = np.concatenate([plan.labels, test_labels])
    member = np.concatenate([plan.member, np.zeros((plan.models, len(test_labels)), dtype=bool)], axis=1)
    return rmia_loo(logits, labels, member, gamma=gamma)[:, : plan.n]


def summarize(audit) -> None:
    """audit.csv (one row per attacked stage: defense and setting), the privacy-utility figure and the mem-score
    decile tables, from the attack records and their scores files; files that would not change are left alone.
    Every file it reads is checked first (the scores against their records' checksums), so a broken one stops
    it with the command that rebuilds it before anything is written."""
    records = audit_report.ordered(read_attack_records(audit))
    if not records:
        folder = os.path.dirname(audit.record_path("x"))
        raise MissingError(f"no audit attack records under {folder}; {audit.again('attack', '--original')}")
    scores = {record["stage"]: read_scores(audit, record) for record in records}
    plan = audit.plan[0]
    estimate = summary_memscores(audit, plan)
    out = audit.flags.out or audit.folder
    os.makedirs(out, exist_ok=True)
    table = audit_report.audit_table(records)
    add_paired_with_base(table, records, scores)
    changed = write_if_changed(os.path.join(out, AUDIT_CSV), table.to_csv(index=False).encode())
    tunings = [(r["defense"], r["tuned"]) for r in audit_report.ordered(records) if r.get("tuned")]
    plane = audit_report.draw_plane(table, tunings)
    changed |= write_if_changed(os.path.join(out, AUDIT_PLANE), audit_report.png_bytes(plane))
    panels = []
    for record in records:
        z = scores[record["stage"]]
        for attack_name in ATTACKS:
            if estimate is not None:
                rows = decile_table(z[f"score_{attack_name}"], z["member"], estimate)
                panels.append((audit_report.row_label(record), attack_name, rows))
    text = audit_report.deciles_markdown(panels, plan)
    changed |= write_if_changed(os.path.join(out, AUDIT_DECILES), text.encode())
    baseline = audit_report.best_baseline(table, audit_report.ordered(records))
    text = "\n\n".join(
        [
            audit_report.markdown_table(table),
            audit_report.paired_markdown(table),
            *([] if baseline is None else [f"The best baseline: {audit_report.row_label(baseline)}."]),
            *([] if baseline is None else [audit_report.paired_markdown(table, "vs_baseline")]),
        ]
    )
    changed |= write_if_changed(os.path.join(out, AUDIT_MD), (text + "\n").encode())
    print(text)
    print(
        ("Wrote" if changed else "Nothing to do: unchanged")
        + f" {out}/{AUDIT_CSV}, {AUDIT_MD}, {AUDIT_PLANE}, {AUDIT_DECILES}"
    )


def summary_memscores(audit, plan):
    """The audit's mem-score estimate (numpy) for the decile tables, None before the memscore step ran."""
    path = audit.memscore_path
    if not os.path.isfile(path):
        return None
    check_memscore_files(audit, path)
    return read_memscores(path, plan.n, audit.rebuild("memscore")).numpy()


def add_paired_with_base(table, records, scores) -> None:
    """Each row minus Base (the first pruned base row; the fine-tuning control is compared with it too) and minus
    the best baseline (the least-leaking of the paper's baselines, audit_report.best_baseline): add_paired's
    _vs_base and _vs_baseline columns."""
    ordered = audit_report.ordered(records)
    base = next((r for r in ordered if r["defense"] == "base" and not audit_report.is_control(r)), None)
    add_paired(table, ordered, scores, base, "vs_base")
    add_paired(table, ordered, scores, audit_report.best_baseline(table, ordered), "vs_baseline")


def add_paired(table, ordered, scores, reference, suffix) -> None:
    """Columns <attack>_<subset>_<metric>_<suffix> (+ _lo, _hi): each row's metric minus the reference record's on
    the same decisions, with loo_attacks.paired_difference's paired cluster bootstrap (the reference's resamples
    and seed); nan on the reference's own row and when there is none. Every stage's models train on the plan's
    halves, so the decisions pair up. scores: each stage's read_scores."""
    columns = {
        f"{attack_name}_{subset}_{short}_{suffix}{end}": [math.nan] * len(ordered)
        for attack_name in ATTACKS
        for subset in SUBSETS
        for short in audit_report.SHORT.values()
        for end in ("", "_lo", "_hi")
    }
    if reference is not None:
        settings, base_scores = reference["attack_settings"], scores[reference["stage"]]
        for i, record in enumerate(ordered):
            if record is reference:
                continue
            z = scores[record["stage"]]
            for attack_name in ATTACKS:
                for subset in SUBSETS:
                    found = paired_difference(
                        z[f"score_{attack_name}"],
                        base_scores[f"score_{attack_name}"],
                        z["member"],
                        z["audited"] if subset == "audited" else None,
                        resamples=settings["bootstrap"],
                        seed=settings["seed"],
                    )
                    for metric, short in audit_report.SHORT.items():
                        key = f"{attack_name}_{subset}_{short}_{suffix}"
                        for end, value in zip(("", "_lo", "_hi"), found[metric]):
                            columns[key + end][i] = value
    for key, values in columns.items():
        table[key] = values


def compare(audit) -> None:
    """compare.md and compare.csv: the audits of several seeds (--seeds; each its own draws of canaries, halves and
    initialisations, in its own folder) side by side: each stage's leakage per seed, its spread, and in how many
    seeds its paired interval against Base and against the best baseline lies below 0 (audit_report.seeds_table).
    Reads each seed's audit.csv, written by its summarize step."""
    tables, seeds = {}, audit.flags.seed_list
    for seed in seeds:
        one = audit.for_seed(seed)
        path = one.path(AUDIT_CSV)
        if not os.path.isfile(path):
            raise MissingError(f"seed {seed}'s audit table {path} not found; {one.again('summarize')}")
        tables[seed] = pd.read_csv(path)
    table = audit_report.seeds_table(tables)
    out = audit.flags.out or audit.for_seed(seeds[0]).folder
    os.makedirs(out, exist_ok=True)
    text = audit_report.seeds_markdown(table, seeds)
    changed = write_if_changed(os.path.join(out, AUDIT_COMPARE + ".csv"), table.to_csv(index=False).encode())
    changed |= write_if_changed(os.path.join(out, AUDIT_COMPARE + ".md"), (text + "\n").encode())
    print(text)
    print(("Wrote" if changed else "Nothing to do: unchanged") + f" {out}/{AUDIT_COMPARE}.csv, .md")
