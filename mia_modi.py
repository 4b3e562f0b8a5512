"""Step 3: membership inference attacks on the pruned victim, calibrated on the shadows.

python mia_modi.py GPU-ID CONFIG --pruner_name iter_pruning --prune_sparsity 0.6 --attacks threshold,samia
                   [--defend slide_re [--defend_arg 4] --adaptive] [--original]
"""
from attacks import ATTACKS, Outputs, model_outputs, parse_attacks
from common import append_log, base_parser, main_guard, parse_args, pick_device, seed_everything
from defenses import get_defense
from models import build_model
from paths import checkpoint, log_path, prefix, pretrained_dir, pruned_dir
from splits import open_run
from train import evaluate, load_checkpoint


def get_args(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--pruner_name", default="l1unstructure")
    parser.add_argument("--prune_sparsity", type=float, default=0.6)
    parser.add_argument("--attacks", default="samia", help=f"comma list of: {', '.join(ATTACKS)}")
    parser.add_argument("--defend", default="", help="the defense the victim was pruned with")
    parser.add_argument("--defend_arg", type=float, default=4)
    parser.add_argument("--adaptive", action="store_true",
                        help="use shadows pruned with the same defense (else Base-pruned shadows)")
    parser.add_argument("--original", action="store_true", help="attack the unpruned victim with unpruned shadows")
    parser.add_argument("--shadow_num", type=int, default=5)
    args = parse_args(parser, argv)
    args.attack_names = parse_attacks(args.attacks)
    get_defense(args.defend)
    return args


def model_folders(args):
    """(victim folder, shadow folders, description for the log, how to create missing ones)."""
    if args.original:
        return (pretrained_dir(args), [pretrained_dir(args, i) for i in range(args.shadow_num)],
                "original", f"run pretrain_modi.py {args.gpu_id} {args.config_path}")
    victim_stem = prefix(args.pruner_name, args.prune_sparsity, args.defend, args.defend_arg)
    shadow_defend = args.defend if args.adaptive else ""
    shadow_stem = prefix(args.pruner_name, args.prune_sparsity, shadow_defend, args.defend_arg)
    setting = "adaptive" if args.adaptive else "base"
    how = (f"run prune_modi.py {args.gpu_id} {args.config_path} --pruner_name {args.pruner_name} "
           f"--prune_sparsity {args.prune_sparsity}")
    if shadow_defend:
        how += f" --defend {args.defend} --defend_arg {args.defend_arg} (plus that defense's flags)"
    return (pruned_dir(args, victim_stem), [pruned_dir(args, shadow_stem, i) for i in range(args.shadow_num)],
            f"{shadow_stem} ({setting})", how)


def main():
    args = get_args()
    seed_everything(args.seed)
    device = pick_device(args.gpu_id)
    data, split = open_run(args, device)
    victim_folder, shadow_folders, setting, how = model_folders(args)
    with_sens = any(ATTACKS[name][1] for name in args.attack_names)

    def outputs(folder, shadow=None):
        model = build_model(args.model_name, args.num_cls, args.input_dim).to(device)
        load_checkpoint(model, checkpoint(folder), "checkpoint", how)
        model_split = split.model(shadow).to(device)
        return model, model_outputs(model, data, model_split, with_sens, max(args.batch_size, 1000))

    shadow = Outputs.cat([outputs(folder, i)[1] for i, folder in enumerate(shadow_folders)])
    victim_model, victim = outputs(victim_folder)
    log = log_path(args)
    test_acc, _ = evaluate(victim_model, data, split.model().test.to(device))
    kind = "original" if args.original else "pruned"
    append_log(log, f"Victim {kind} model test accuracy: {test_acc:.3f}")
    append_log(log, f"Shadows: {setting}")
    for name in args.attack_names:
        for result in ATTACKS[name][0](shadow, victim, args.num_cls):
            append_log(log, f"{result.name} attack accuracy: {result.accuracy:.3f}")


if __name__ == "__main__":
    main_guard(main)
