"""Step 3: membership inference attacks on the pruned victim, calibrated on the shadows.

python mia_modi.py GPU-ID CONFIG --pruner_name iter_pruning --prune_sparsity 0.6 --attacks threshold,samia
                   [--defend slide_re [--defend_arg 4] --adaptive] [--original] [--shadow_num 5] [--rmia_gamma 1]
"""

import numpy as np
import torch

from attacks import (
    ATTACKS,
    METRIC_DIGITS,
    Outputs,
    References,
    _rankable,
    add_attack_flags,
    attacked_rows,
    check_attack_flags,
    metric_lines,
    metric_values,
    model_outputs,
    parse_attacks,
    true_label_prob,
)
from auto_settings import AUTO
from common import (
    RunLog,
    UsageError,
    base_parser,
    log_gpu_usage,
    main_guard,
    parse_args,
    pick_device,
    run_first,
    seed_everything,
)
from defenses import add_defense_flags, get_defense
from intervals import LEVEL, RESAMPLES, Attacked, bootstrap
from paths import DEFAULT_SEED, checkpoint, log_path, pretrained_dir, pruned_dir, tagged
from progress import Progress
from pruning import add_pruning_flags, check_pruned, check_pruning_flags
from records import Recorder, block_start, logged, number, run_fields
from splits import check_config, open_run
from train import evaluate, load_model, predict, warn_release_format


def get_args(argv=None):
    parser = base_parser(__doc__)
    add_pruning_flags(parser)
    parser.add_argument("--attacks", default="samia", help=f"comma list of: {', '.join(ATTACKS)}")
    add_defense_flags(parser)
    parser.add_argument(
        "--adaptive", action="store_true", help="use shadows pruned with the same defense (else Base-pruned shadows)"
    )
    parser.add_argument("--original", action="store_true", help="attack the unpruned victim with unpruned shadows")
    parser.add_argument("--shadow_num", type=int, default=5)
    add_attack_flags(parser)
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=RESAMPLES,
        metavar="N",
        help="resamples of the 95%% intervals in the run record (0: none)",
    )
    args = parse_args(parser, argv)
    args.attack_names = parse_attacks(args.attacks)
    args.auto = get_defense(args.defend).auto_flags(args)  # the victim's names say so (prune_modi.py)
    check_config(args)
    check_pruning_flags(args.pruner_name, args.prune_sparsity)
    if args.shadow_num < 1:
        raise UsageError(f"the attacks need shadows: --shadow_num must be >= 1, got {args.shadow_num}")
    check_attack_flags(args)
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap is a number of resamples (0: no intervals), got {args.bootstrap}")
    if args.original and args.adaptive:
        raise UsageError("--original attacks the unpruned models, which have no defense; drop --adaptive")
    if args.original and args.defend not in ("", "base"):
        raise UsageError(f"--original attacks the unpruned models, which have no defense; drop --defend {args.defend}")
    if args.adaptive and args.defend in ("", "base"):
        raise UsageError(
            "--adaptive uses shadows pruned with the victim's defense, and there is none; add "
            "--defend NAME, or drop --adaptive for Base"
        )
    return args


def prune_command(args, defense):
    """What creates the pruned models of `defense` that this attack reads."""
    flags = [
        "--pruner_name",
        args.pruner_name,
        "--prune_sparsity",
        str(args.prune_sparsity),
        "--shadow_num",
        str(args.shadow_num),
    ]
    if defense.name != "base":
        flags += ["--defend", defense.name]
        if defense.arg_in_name:
            flags += ["--defend_arg", str(args.defend_arg)]
        auto = defense.auto_flags(args)  # the values of an auto run are derived again, the others typed again
        if defense.window:
            flags += [f for flag in ("stride", "width") for f in (f"--{flag}", AUTO if flag in auto else f"<{flag}>")]
        flags += ["--mem_thre", AUTO] if "mem_thre" in auto else []
        if defense.semantics_differ and args.semantics != "release":
            flags += ["--semantics", args.semantics]
    if args.seed != DEFAULT_SEED:
        flags += ["--seed", str(args.seed)]
    if args.tag:
        flags += ["--tag", args.tag]
    return run_first("prune_modi.py", args, *flags)


def victim_prefix(args, defense):
    """The pruned victim's name (the log's and the result folders'), also for --original runs, which log there."""
    auto = bool(defense.auto_flags(args))
    return tagged(
        defense.prefix(args.pruner_name, args.prune_sparsity, args.defend_arg, args.semantics, auto), args.tag
    )


def model_folders(args, defense):
    """(victim folder, shadow folders, description for the log, how to create the victim, the shadows)."""
    if args.original:
        how = run_first("pretrain_modi.py", args, "--shadow_num", str(args.shadow_num))
        return (pretrained_dir(args), [pretrained_dir(args, i) for i in range(args.shadow_num)], "original", how, how)
    shadow_defense = defense if args.adaptive else get_defense("base")
    shadow_prefix = tagged(
        shadow_defense.prefix(
            args.pruner_name,
            args.prune_sparsity,
            args.defend_arg,
            args.semantics,
            bool(shadow_defense.auto_flags(args)),
        ),
        args.tag if args.adaptive else "",
    )  # Base: untagged
    setting = "adaptive" if args.adaptive else "base"
    return (
        pruned_dir(args, victim_prefix(args, defense)),
        [pruned_dir(args, shadow_prefix, i) for i in range(args.shadow_num)],
        f"{shadow_prefix} ({setting})",
        prune_command(args, defense),
        prune_command(args, shadow_defense),
    )


def score_arrays(victim_rows, victim, n_train, results):
    """The scores file's arrays, one entry per attacked victim sample: its index in the split's index space
    (training rows first, then test rows), the set it comes from ("train"/"test") and its index there, its
    label and membership, and each attack's member score (the values its AUC is computed from)."""
    index = victim_rows.cpu().numpy().astype(np.int64)
    in_train = index < n_train
    arrays = {
        "index": index,
        "set": np.where(in_train, "train", "test"),
        "set_index": np.where(in_train, index, index - n_train),
        "label": victim.labels.cpu().numpy().astype(np.int64),
        "member": victim.member.cpu().numpy(),
        "attacks": np.array([r.name for r in results]),
    }
    arrays.update({f"score_{r.name}": np.asarray(r.scores, dtype=np.float64) for r in results})
    arrays["accuracy_kind"] = np.array([r.accuracy_kind or "" for r in results])  # intervals.ACCURACY_KINDS
    arrays.update(
        {f"decision_{r.name}": np.asarray(r.decisions, dtype=bool) for r in results if r.decisions is not None}
    )
    return arrays


def result_intervals(result, resamples, seed) -> dict:
    """{metric: [lower, upper]} of the 95 % bootstrap intervals over the attacked samples. The accuracy's
    only where its value on all samples is the logged accuracy (an attack whose accuracy is computed
    otherwise gets none)."""
    attacked = Attacked(
        _rankable(result.scores), np.asarray(result.member, bool), result.accuracy_kind, result.decisions
    )
    found = bootstrap(attacked, resamples, seed)
    if not abs(found["accuracy"][0] - result.accuracy) < 1e-4:
        result.accuracy_kind = None
        found.pop("accuracy")
    return {metric: [number(lo), number(hi)] for metric, (_, lo, hi) in found.items()}


def main():
    args = get_args()
    defense = get_defense(args.defend)
    setting_word = "original" if args.original else "adaptive" if args.adaptive else "base"
    prefix = victim_prefix(args, defense)
    run = run_fields(args, prefix, args.defend_arg if defense.arg_in_name else None)
    recorder = Recorder("attack", args, {**run, "setting": setting_word})
    device = pick_device(args.gpu_id)
    data, split = open_run(args, device)
    victim_folder, shadow_folders, setting, victim_how, shadow_how = model_folders(args, defense)
    with_sens = any(ATTACKS[name].needs_sensitivity for name in args.attack_names)
    with_shadow_logits = any(ATTACKS[name].needs_shadow_logits for name in args.attack_names)
    with_references = any(ATTACKS[name].needs_references for name in args.attack_names)

    def how(shadow=None):  # the command that makes this model
        return victim_how if shadow is None else shadow_how

    def load(folder, shadow=None):
        return load_model(args, checkpoint(folder), device, "checkpoint", how(shadow), finished=True)

    release_format = []
    for i, folder in [(None, victim_folder)] + list(enumerate(shadow_folders)):  # all finished before any work
        split.indices(i)  # the split has this shadow
        model, ckpt = load(folder, i)
        if not args.original:
            check_pruned(model, folder, args.prune_sparsity, how(i))
        if "state" not in ckpt:
            release_format.append(checkpoint(folder))
    warn_release_format(release_format)
    seed_everything(args.seed)  # after the checks, which build models

    def outputs(folder, shadow=None):
        model = load(folder, shadow)[0]
        model_split = split.indices(shadow).to(device)
        return model, model_outputs(model, data, model_split, with_sens, max(args.batch_size, 1000))

    victim_rows = attacked_rows(split.indices().to(device))
    model_splits = [split.indices()] + [split.indices(i) for i in range(args.shadow_num)]
    reference_rows = References.all_rows(model_splits[0], len(data)) if with_references else None
    shadow_parts, shadow_logits, reference_probs = [], [], []

    def reference_prob(model):  # RMIA: every model on every row, the victim's attacked rows first
        rows = torch.from_numpy(reference_rows).to(device)
        return true_label_prob(predict(model, data, rows), data.y[rows]).cpu().numpy()

    for i, folder in enumerate(shadow_folders):
        shadow_model, part = outputs(folder, i)
        shadow_parts.append(part)
        if with_shadow_logits:  # LiRA: every shadow on the victim's members and non-members
            shadow_logits.append(predict(shadow_model, data, victim_rows))
        if with_references:
            reference_probs.append(reference_prob(shadow_model))
    shadow = Outputs.cat(shadow_parts)
    victim_model, victim = outputs(victim_folder)
    if with_shadow_logits:
        victim.shadow_logits = torch.stack(shadow_logits)
    if with_references:
        victim.references = References.from_split(
            model_splits,
            reference_rows,
            int(split.meta["n_train"]),
            np.stack([reference_prob(victim_model)] + reference_probs),
        )
    recorder.check_writable()  # before the log's first line
    log = RunLog(log_path(args, bool(args.auto)))
    test_acc, _ = evaluate(victim_model, data, split.indices().test.to(device))
    kind = "original" if args.original else "pruned"
    first = f"Victim {kind} model test accuracy: {test_acc:.3f}"
    log.write(first)
    start = block_start(log, first)
    log.write(f"Shadows: {setting}")
    log.write(f"Semantics: {args.semantics}")
    recorder.results.update(
        victim=kind,
        victim_test_acc=logged(test_acc),
        shadows=setting,
        attacks=[],
        members=len(split.indices().train),
        nonmembers=len(split.indices().test),
    )
    if args.bootstrap:
        recorder.results["bootstrap"] = {"resamples": args.bootstrap, "seed": args.seed, "level": LEVEL}
    progress = Progress(args.quiet)
    results = []
    for name in args.attack_names:
        for result in ATTACKS[name].fn(shadow, victim, args.num_cls, progress, args.semantics, args):
            log.write(f"{result.name} attack accuracy: {result.accuracy:.3f}")
            values = metric_values(result)
            for line in metric_lines(result, values) + result.notes:
                log.write(line)
            numbers = {
                "accuracy": logged(result.accuracy),
                **{metric: logged(v, METRIC_DIGITS.get(metric, 3)) for metric, v in values.items()},
            }
            if args.bootstrap:
                numbers["intervals"] = result_intervals(result, args.bootstrap, args.seed)
            recorder.results["attacks"].append({"name": result.name, **numbers})
            results.append(result)
    name = f"{prefix}_{setting_word}_{args.semantics}"
    scores = recorder.save_scores(name, score_arrays(victim_rows, victim, int(split.meta["n_train"]), results))
    log.write(f"Scores: {scores}")
    log_gpu_usage(device, log)
    recorder.save(name, log, start)
    log.close()


if __name__ == "__main__":
    main_guard(main)
