"""Step 2: iteratively prune and fine-tune the victim and the shadows under a defense.

python prune_modi.py GPU-ID CONFIG --pruner_name iter_pruning --prune_sparsity 0.6 --prune_iter 5
                     [--defend slide_re --stride 50 --width 500] [--defend ppb --defend_arg 4] ...
--stride, --width and --mem_thre also take `auto`: derived from the victim's training set (auto_settings.py).
"""

import time

from auto_settings import derive
from common import (
    RunLog,
    UsageError,
    base_parser,
    check_writable,
    log_gpu_usage,
    main_guard,
    parse_args,
    pick_device,
    run_first,
    seed_everything,
)
from defenses import DefenseSettings, add_defense_flags, get_defense
from memscores import load_memscores
from models import build_model
from paths import checkpoint, log_path, memscore_path, pretrained_dir, pruned_dir, run_name, split_path, tagged
from progress import Progress
from pruning import Pruner, add_pruning_flags, check_prune_iter, check_pruning_flags, masked_fraction, prunable_layers
from records import Recorder, block_start, logged, run_fields
from splits import check_config, open_run
from train import Staging, evaluate, fit, load_model, mark_finished, warn_release_format


def get_args(argv=None):
    parser = base_parser(__doc__)
    add_pruning_flags(parser)
    parser.add_argument("--prune_iter", type=int, default=5)
    parser.add_argument("--prune_epochs", type=int, default=21, help="fine-tuning epochs per iteration")
    add_defense_flags(parser)
    parser.add_argument("--shadow_num", type=int, default=5)
    parser.add_argument("--early_stop", type=int, default=5, help="epochs without dev improvement; 0 = off")
    args = parse_args(parser, argv)
    force_defense_flags(args)
    check_config(args)
    check_pruning_flags(args.pruner_name, args.prune_sparsity)
    if args.prune_iter < 1 or args.prune_epochs < 1:
        raise UsageError(f"--prune_iter and --prune_epochs must be >= 1, got {args.prune_iter} and {args.prune_epochs}")
    check_prune_iter(args.pruner_name, args.prune_iter)
    get_defense(args.defend).check_args(DefenseSettings.from_args(args))
    args.auto = get_defense(args.defend).auto_flags(args)  # the settings main() derives from the data
    prunable_layers(build_model(args.model_name, args.num_cls, args.input_dim), args.pruner_name)  # pruner fits?
    return args


def force_defense_flags(args) -> None:
    """Apply the defense's forced_flags to args; args.forced keeps each flag they changed as (given, used)."""
    forced = get_defense(args.defend).forced_flags(args.semantics)
    args.forced = {flag: (getattr(args, flag), value) for flag, value in forced.items() if getattr(args, flag) != value}
    for flag, value in forced.items():
        setattr(args, flag, value)


def forced_line(args, defense) -> str:
    """The log line that says which flags the defense overrode, or None."""
    if not args.forced:
        return None
    changes = ", ".join(f"--{flag} {given} -> {used}" for flag, (given, used) in args.forced.items())
    return f"Flags forced by --defend {defense.name} under --semantics {args.semantics}: {changes}"


def header(args, defense, prefix):
    """First log line: <ds>_<model>_<prefix>[_<stride>-<width>]_<weight_decay_mem>."""
    window = f"_{args.stride}-{args.width}" if defense.window else ""
    return f"{run_name(args)}_{prefix}{window}_{args.weight_decay_mem}"


def pretrained_fix(args):
    return run_first("pretrain_modi.py", args, "--shadow_num", str(args.shadow_num))


def check_prerequisites(args, defense, settings, data, model_splits, memscores):
    """Before any log line: every pretrained checkpoint is a finished one that loads into this config's
    model, and the defense can be set up for it (its constructor checks what depends on the data, e.g.
    window sizes)."""
    release_format = []
    for who, model_split in zip([None] + list(range(args.shadow_num)), model_splits):
        path = checkpoint(pretrained_dir(args, who))
        model, ckpt = load_model(
            args, path, data.y.device, "pretrained checkpoint", pretrained_fix(args), finished=True
        )
        if "state" not in ckpt:
            release_format.append(path)
        defense(model, data, model_split, settings, memscores)
    warn_release_format(release_format)


def prune_one(args, defense, settings, data, model_split, source, target, log, tag, memscores, progress, history):
    """Load the pretrained model from `source`, prune + fine-tune it under `defense` (prune_model), export bests
    into `target` and mark it finished. The same procedure serves the victim and every shadow."""
    model, _ = load_model(args, checkpoint(source), data.y.device, "pretrained checkpoint", pretrained_fix(args))
    _, pruner, _ = prune_model(
        args, model, defense, settings, data, model_split, target, log, tag, memscores, progress, history
    )
    mark_finished(
        target,
        split_path(args),
        script="prune_modi.py",
        target_sparsity=args.prune_sparsity,
        sparsity=masked_fraction(pruner.masks.values()),
    )
    return model


def prune_model(args, model, defense, settings, data, model_split, target, log, tag, memscores, progress, history):
    """Prune `model` iteratively (args.pruner_name, args.prune_sparsity, args.prune_iter) and fine-tune it under
    `defense` for args.prune_epochs per iteration with early stopping on model_split.dev; every new best of an
    iteration is exported into `target` (best.pth, best_mask.pth), so the folder ends with the best epoch of the
    last iteration, while the next iteration goes on from the last epoch's weights (the defense and its
    optimizers live through all iterations). TensorBoard steps count fine-tuning epochs from the first
    iteration (iteration * prune_epochs + epoch); iteration-level curves use the iteration. Each iteration's
    logged numbers are appended to `history`. Returns (model, pruner, trainer). prune_modi.py and audit.py
    share it."""
    pruner = Pruner(model, args.pruner_name, args.prune_sparsity, args.prune_iter)
    trainer = defense(model, data, model_split, settings, memscores)
    model_tag = tag.replace(" ", "_")
    for iteration in progress.bar(range(len(pruner.schedule)), desc=f"{tag} pruning"):
        pruner.prune(iteration)
        with progress.epochs(
            model_tag, args.prune_epochs, iteration * args.prune_epochs, desc=f"{tag} iter {iteration}"
        ) as on_epoch:
            best_acc, last_loss = fit(
                model,
                trainer.train_epoch,
                data,
                model_split.dev,
                model_split.test,
                args.prune_epochs,
                args.early_stop,
                on_best=lambda epoch, acc, loss: pruner.export(target, epoch, acc, loss),
                on_epoch=on_epoch,
                start_acc=0.0 if args.semantics == "release" else -1.0,
            )
        log.write(f"{tag} iter {iteration} best model: Accuracy {best_acc:.3f}, Loss {last_loss:.3f}")
        progress.add(f"{model_tag}/iteration_sparsity", masked_fraction(pruner.masks.values()), iteration)
        progress.add(f"{model_tag}/iteration_best_dev_acc", best_acc, iteration)
        extra = trainer.iteration_summary()
        if extra:
            log.write(extra)
        history.append({"accuracy": logged(best_acc), "loss": logged(last_loss)})
        if callable(getattr(trainer, "epsilon", None)):  # dp: the total so far, as its log line says
            history[-1]["dp_epsilon"] = logged(trainer.epsilon())
    return model, pruner, trainer


def main():
    args = get_args()
    defense = get_defense(args.defend)
    device = pick_device(args.gpu_id)
    data, split = open_run(args, device)
    memscores = None
    if defense.needs_memscore:
        memscores = load_memscores(args, data, int(split.meta["n_train"]))  # data: training rows first
    # each setting given as auto: one value for the victim and every shadow, from the victim's training set
    resolved, auto_line = derive(args.auto, data.y[split.indices().train.to(device)], memscores)
    vars(args).update(resolved)
    settings = DefenseSettings.from_args(args)
    if defense.needs_memscore:
        defense.check_memscores(memscores, settings, memscore_path(args.dataset_name, args.model_name))
    prefix = tagged(
        defense.prefix(args.pruner_name, args.prune_sparsity, args.defend_arg, args.semantics, bool(args.auto)),
        args.tag,
    )
    recorder = Recorder(
        "prune",
        args,
        run_fields(
            args,
            prefix,
            args.defend_arg if defense.arg_in_name else None,
            f"{args.stride}-{args.width}" if defense.window else None,
        ),
    )
    log = RunLog(log_path(args, bool(args.auto)))
    shadows = [split.indices(i).to(device) for i in range(args.shadow_num)]  # checks shadow_num early
    victim_split = split.indices().to(device)
    check_prerequisites(args, defense, settings, data, [victim_split] + shadows, memscores)
    seed_everything(args.seed)  # after the checks, which build models

    targets = [pruned_dir(args, prefix)] + [pruned_dir(args, prefix, i) for i in range(args.shadow_num)]
    for target in targets:  # before the log's first line: a run that cannot publish its models writes nothing
        check_writable(target)
    recorder.check_writable()
    progress = Progress.from_args(args, prefix)  # so is a TensorBoard path that cannot be written

    first = header(args, defense, prefix)
    log.write(first)
    log_start = block_start(log, first)
    log.write(f"Semantics: {args.semantics}")
    if forced_line(args, defense):  # as the release's DP pruning script, which hard-codes them
        log.write(forced_line(args, defense))
    if auto_line:
        log.write(auto_line)
    victim_scores = None if memscores is None else memscores[victim_split.train.cpu()]
    for line in defense.header_lines(settings, data.y[victim_split.train], victim_scores, memscores):
        log.write(line)
    victim, _ = load_model(
        args,
        checkpoint(pretrained_dir(args)),
        device,
        "pretrained victim checkpoint",
        run_first("pretrain_modi.py", args),
    )
    acc, loss = evaluate(victim, data, victim_split.test)
    log.write(f"Pretrained Victim: Accuracy {acc:.3f}, Loss {loss:.3f}")
    iterations = {}
    recorder.results.update(pretrained={"accuracy": logged(acc), "loss": logged(loss)}, iterations=iterations)

    with Staging(targets) as staging:  # the folders keep the last finished run's models until all of these are
        victim_target, *shadow_targets = staging.staged
        start = time.time()
        prune_one(
            args,
            defense,
            settings,
            data,
            victim_split,
            pretrained_dir(args),
            victim_target,
            log,
            "victim",
            memscores,
            progress,
            iterations.setdefault("victim", []),
        )
        defend_time = time.time() - start
        log.write(f"Total {defense.label or defense.name} defend time: {defend_time:.3f}s")
        recorder.results.update(
            defend_time_s=logged(defend_time), dp_epsilon=iterations["victim"][-1].get("dp_epsilon")
        )
        for i, (shadow_split, target) in enumerate(zip(shadows, shadow_targets)):
            prune_one(
                args,
                defense,
                settings,
                data,
                shadow_split,
                pretrained_dir(args, i),
                target,
                log,
                f"shadow {i}",
                memscores,
                progress,
                iterations.setdefault(f"shadow {i}", []),
            )
        staging.publish()
    progress.close()
    log_gpu_usage(device, log)
    recorder.save(f"{prefix}_{args.semantics}", log, log_start)
    log.close()


if __name__ == "__main__":
    main_guard(main)
