"""Step 1: split the data and train the victim and the shadow models.

python pretrain_modi.py GPU-ID CONFIG [--shadow_num 5] [--early_stop 5] [--seed 7] [--force | --skip_existing]
"""

import os

from common import (
    DivergedError,
    MissingError,
    RunLog,
    UsageError,
    base_parser,
    log_gpu_usage,
    main_guard,
    parse_args,
    pick_device,
    seed_everything,
)
from datasets import TensorData, get_dataset
from models import build_model
from paths import SPLIT_FILE, checkpoint, log_dir, pretrained_dir, run_name, split_path
from progress import Progress
from splits import Split, check_config
from train import (
    Staging,
    evaluate,
    fit,
    is_finished,
    load_checkpoint,
    make_optimizer,
    mark_finished,
    save_checkpoint,
    train_pass,
)


def get_args(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--shadow_num", type=int, default=5)
    parser.add_argument("--early_stop", type=int, default=5, help="epochs without dev improvement; 0 = off")
    parser.add_argument("--force", action="store_true", help="rebuild a split that does not match this run")
    parser.add_argument(
        "--skip_existing",
        action="store_true",
        help="keep models that finished training (best.pth and its completion record)",
    )
    args = parse_args(parser, argv)
    if args.force and args.skip_existing:
        raise UsageError("--force rebuilds the split, so existing models would be stale; drop --skip_existing")
    return args


def prepare_split(args, n_train, n_test):
    """(split, whether it is new): the persisted split when it matches this run; a new one when absent or
    --force, saved by the caller together with the models trained on it."""
    path = split_path(args)
    if os.path.exists(path) and not args.force:
        split = Split.load(path)
        why = split.mismatch(args.dataset_name, n_train, n_test, args.seed, args.shadow_num)
        if why:
            raise MissingError(
                f"existing data split {path} cannot be reused: {why}; pass --force to "
                f"rebuild it (models trained on the old split become stale)"
            )
        print(f"Reusing data split {path}")
        return split, False
    return Split.create(args.dataset_name, n_train, n_test, args.seed, args.shadow_num), True


def pretrain(args, data, model_split, folder, progress, tag="victim"):
    """Train one target model with the plain recipe (shuffled cross-entropy epochs, the config's
    optimizer); keep the best-dev checkpoint in folder. Per-epoch curves go to progress under `tag`.
    The best dev accuracy starts at 0, as in the release (and in prune_modi.py's --semantics release): an
    epoch of exactly 0 % is never kept, and a model with no better epoch is an error. The pretrained models
    serve both semantics, so there is no corrected rule here."""
    model = build_model(args.model_name, args.num_cls, args.input_dim).to(data.y.device)
    optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)
    path = checkpoint(folder)
    with progress.epochs(tag, args.epochs) as on_epoch:
        best_acc, _ = fit(
            model,
            lambda epoch: train_pass(model, data, model_split.train, optimizer, args.batch_size),
            data,
            model_split.dev,
            model_split.test,
            args.epochs,
            args.early_stop,
            on_best=lambda epoch, acc, loss: save_checkpoint(path, model, epoch, acc, loss),
            on_epoch=on_epoch,
            start_acc=0.0,
        )
    if best_acc <= 0:  # no epoch beat the start
        raise DivergedError(
            f"the {tag.replace('_', ' ')} scored 0 % dev accuracy in every epoch, so no model was kept (as in "
            f"the release, an epoch is kept only above the best so far, which starts at 0); check the "
            f"config's lr, or train longer (--epochs, --early_stop)"
        )
    best = load_checkpoint(model, path, "checkpoint", "rerun pretrain_modi.py")
    return best, evaluate(model, data, model_split.test)


def main():
    args = get_args()
    check_config(args)
    seed_everything(args.seed)
    device = pick_device(args.gpu_id)
    train, test = get_dataset(args.dataset_name)
    split, new_split = prepare_split(args, len(train), len(test))
    data = TensorData.concat(train, test).to(device, amp=args.amp)
    todo = []
    for who in [None] + list(range(args.shadow_num)):
        folder = pretrained_dir(args, who)
        if args.skip_existing and is_finished(folder):
            print(
                f"Skipping {'victim' if who is None else f'shadow {who}'}: {checkpoint(folder)} exists "
                f"(--skip_existing)"
            )
        else:
            todo.append((who, folder))
    # All of this run's models (and a new split) are staged and published together: a run that fails leaves
    # the run folder as it was. Staging checks that every folder can be written before anything is.
    with Staging([folder for _, folder in todo]) as staging:
        split_file = split_path(args)
        if new_split:  # in the first staged folder until publish (a kill -9 leaves it there, with the folder)
            split_file = os.path.join(staging.staged[0], SPLIT_FILE) if todo else split_file
            split.save(split_file)
        progress = Progress.from_args(args, "pretrain")  # before the log: a bad TensorBoard path writes nothing
        log = RunLog(os.path.join(log_dir(args), "pretrain.txt"))
        log.write(f"{run_name(args)} pretrain seed {args.seed} epochs {args.epochs}")
        for (who, _folder), staged in zip(todo, staging.staged):
            name = "victim" if who is None else f"shadow {who}"
            seed_everything(args.seed + (0 if who is None else who + 1))  # a model does not depend on those before it
            best, (test_acc, test_loss) = pretrain(
                args, data, split.indices(who).to(device), staged, progress, name.replace(" ", "_")
            )
            mark_finished(staged, split_file, script="pretrain_modi.py", epoch=best["epoch"], dev_acc=best["acc"])
            log.write(
                f"Pretrained {name}: epoch {best['epoch']}, dev Accuracy {best['acc']:.3f}, "
                f"test Accuracy {test_acc:.3f}, Loss {test_loss:.3f}"
            )
        if split_file != split_path(args):
            os.replace(split_file, split_path(args))
        staging.publish()
    progress.close()
    log_gpu_usage(device, log)
    log.close()


if __name__ == "__main__":
    main_guard(main)
