"""Step 2: iteratively prune and fine-tune the victim and the shadows under a defense.

python prune_modi.py GPU-ID CONFIG --pruner_name iter_pruning --prune_sparsity 0.6 --prune_iter 5
                     [--defend slide_re --stride 50 --width 500] [--defend ppb --defend_arg 4] ...
"""
import time

from common import (UsageError, append_log, base_parser, log_gpu_usage, main_guard, parse_args, pick_device,
                    seed_everything)
from defenses import get_defense
from models import build_model
from paths import checkpoint, log_path, prefix, pretrained_dir, pruned_dir, run_name
from progress import Scalars, epoch_monitor, progress_bar
from pruning import PRUNERS, Pruner, check_pruning_flags, prunable_layers
from splits import check_config, open_run
from train import evaluate, fit, load_checkpoint


def get_args(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--pruner_name", default="l1unstructure", help=", ".join(PRUNERS))
    parser.add_argument("--prune_sparsity", type=float, default=0.6)
    parser.add_argument("--prune_iter", type=int, default=5)
    parser.add_argument("--prune_epochs", type=int, default=21, help="fine-tuning epochs per iteration")
    parser.add_argument("--defend", default="", help="'' (Base) or a defense name")
    parser.add_argument("--defend_arg", type=float, default=4)
    parser.add_argument("--dp_microbatch", type=int, default=None,
                        help="dp: examples per clipped microbatch (default batch_size//2; 1 = per-example)")
    parser.add_argument("--stride", type=int, default=None, help="window step (slide defenses)")
    parser.add_argument("--width", type=int, default=None, help="window width (slide defenses)")
    parser.add_argument("--weight_decay_mem", type=float, default=5e-4, help="risk-side weight decay (ml2)")
    parser.add_argument("--mem_thre", type=float, default=0.6, help="mem-score threshold (ml2)")
    parser.add_argument("--shadow_num", type=int, default=5)
    parser.add_argument("--early_stop", type=int, default=5, help="epochs without dev improvement; 0 = off")
    args = parse_args(parser, argv)
    check_config(args)
    check_pruning_flags(args.pruner_name, args.prune_sparsity)
    if args.prune_iter < 1 or args.prune_epochs < 1:
        raise UsageError(f"--prune_iter and --prune_epochs must be >= 1, got {args.prune_iter} and {args.prune_epochs}")
    get_defense(args.defend).check_args(args)
    prunable_layers(build_model(args.model_name, args.num_cls, args.input_dim), args.pruner_name)  # pruner fits?
    return args


def header(args, prefix_):
    """First log line: <ds>_<model>_<prefix>[_<stride>-<width>]_<weight_decay_mem>."""
    window = f"_{args.stride}-{args.width}" if get_defense(args.defend).window else ""
    return f"{run_name(args)}_{prefix_}{window}_{args.weight_decay_mem}"


def check_prerequisites(args, data, model_splits, memscores):
    """Before any log line: every pretrained checkpoint loads into this config's model and the defense
    can be set up for it (its constructor checks what depends on the data, e.g. window sizes)."""
    fix = f"run pretrain_modi.py {args.gpu_id} {args.config_path} --shadow_num {args.shadow_num} first"
    for who, model_split in zip([None] + list(range(args.shadow_num)), model_splits):
        model = build_model(args.model_name, args.num_cls, args.input_dim).to(data.y.device)
        load_checkpoint(model, checkpoint(pretrained_dir(args, who)), "pretrained checkpoint", fix)
        get_defense(args.defend)(model, data, model_split, args, memscores)


def mask_sparsity(pruner):
    """Fraction of the prunable layers' weights that are masked out."""
    masks = pruner.masks.values()
    return sum((m == 0).sum().item() for m in masks) / max(sum(m.numel() for m in masks), 1)


def prune_one(args, data, model_split, source, target, log, tag, memscores, scalars=None):
    """Load the pretrained model from `source`, prune + fine-tune it, export bests into `target`.
    The same procedure serves the victim and every shadow. TensorBoard steps count fine-tuning epochs
    from the first iteration (iteration * prune_epochs + epoch); iteration-level curves use the iteration."""
    model = build_model(args.model_name, args.num_cls, args.input_dim).to(data.y.device)
    load_checkpoint(model, checkpoint(source), "pretrained checkpoint",
                    f"run pretrain_modi.py {args.gpu_id} {args.config_path} first")
    pruner = Pruner(model, args.pruner_name, args.prune_sparsity, args.prune_iter)
    defense = get_defense(args.defend)(model, data, model_split, args, memscores)
    scalars, model_tag = scalars or Scalars(), tag.replace(" ", "_")
    for iteration in progress_bar(range(len(pruner.schedule)), desc=f"{tag} pruning"):
        pruner.prune(iteration)
        with epoch_monitor(scalars, model_tag, args.prune_epochs, iteration * args.prune_epochs,
                           desc=f"{tag} iter {iteration}") as on_epoch:
            best_acc, last_loss = fit(model, defense.train_epoch, data, model_split.dev, model_split.test,
                                      args.prune_epochs, args.early_stop,
                                      on_best=lambda epoch, acc, loss: pruner.export(target, epoch, acc, loss),
                                      on_epoch=on_epoch)
        append_log(log, f"{tag} iter {iteration} best model: Accuracy {best_acc:.3f}, Loss {last_loss:.3f}")
        scalars.add(f"{model_tag}/iteration_sparsity", mask_sparsity(pruner), iteration)
        scalars.add(f"{model_tag}/iteration_best_dev_acc", best_acc, iteration)
        extra = defense.iteration_summary()
        if extra:
            append_log(log, extra)
    return model


def main():
    args = get_args()
    device = pick_device(args.gpu_id)
    data, split = open_run(args, device)
    defense_cls = get_defense(args.defend)
    memscores = defense_cls.load_memscores(args, int(split.meta["n_train"])) if defense_cls.needs_memscore else None
    stem = prefix(args.pruner_name, args.prune_sparsity, args.defend, args.defend_arg)
    log = log_path(args)
    shadows = [split.model(i).to(device) for i in range(args.shadow_num)]  # checks shadow_num early
    victim_split = split.model().to(device)
    check_prerequisites(args, data, [victim_split] + shadows, memscores)
    seed_everything(args.seed)  # after the checks, which build models

    append_log(log, header(args, stem))
    scalars = Scalars(args, stem)
    victim = build_model(args.model_name, args.num_cls, args.input_dim).to(device)
    load_checkpoint(victim, checkpoint(pretrained_dir(args)), "pretrained victim checkpoint",
                    f"run pretrain_modi.py {args.gpu_id} {args.config_path} first")
    acc, loss = evaluate(victim, data, victim_split.test)
    append_log(log, f"Pretrained Victim: Accuracy {acc:.3f}, Loss {loss:.3f}")

    start = time.time()
    prune_one(args, data, victim_split, pretrained_dir(args), pruned_dir(args, stem), log, "victim", memscores,
              scalars)
    append_log(log, f"Total {defense_cls.label or defense_cls.name} defend time: {time.time() - start:.3f}s")
    for i, shadow_split in enumerate(shadows):
        prune_one(args, data, shadow_split, pretrained_dir(args, i), pruned_dir(args, stem, i), log,
                  f"shadow {i}", memscores, scalars)
    scalars.close()
    log_gpu_usage(device, log)


if __name__ == "__main__":
    main_guard(main)
