"""The audit's utility-matched DP-SGD baseline (audit.py tune_dp): the noise multiplier picked on tuning
shadows, never on the audited models, as the largest noise whose accuracy matches the target."""

import argparse
import json
import math
import os

import numpy as np

from audit_common import (
    audit_data,
    load_json,
    load_plan,
    model_split,
    pretrained_folders,
    prune_tuning_models,
    read_attack_records,
    tuned_for,
    write_json,
)
from audit_plan import membership
from audit_train import train_models
from common import (
    MissingError,
    RunLog,
    UsageError,
    pick_device,
)
from defenses import DEFENSES, DefenseSettings, get_defense
from paths import (
    audit_dp_noise_path,
    audit_log_path,
    run_name,
)
from prune_modi import force_defense_flags
from records import number
from train import (
    evaluate,
)

DEFAULT_NOISE = (0.5, 1.0, 2.0, 4.0, 8.0)


TUNING_MODELS = 4


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


def wemem_records(args) -> list:
    """The attack records of the mem-score (WeMeM) defenses audited so far."""
    needs_memscore = lambda record: record["defense"] in DEFENSES and DEFENSES[record["defense"]].needs_memscore
    return [record for record in read_attack_records(args) if needs_memscore(record)]


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
        old = load_json(path)[0] or {}  # an unreadable one is tuned again
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
    splits = [model_split(plan, member[j], data.y.device) for j in range(len(sources))]
    accs, epsilon = [], float("nan")
    for j, best, history in prune_tuning_models(trial_args, defense, settings, data, sources, splits, None, "tune_dp"):
        accs.append(evaluate(best, data, splits[j].test)[0])
        epsilon = float(history[-1]["dp_epsilon"])
    return accs, epsilon
