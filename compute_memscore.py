"""Mem-scores of a config's training set with the subsampled estimator of Feldman & Zhang (2020).

python compute_memscore.py GPU-ID CONFIG [--num_models 100] [--subset_ratio 0.7] [--epochs E] [--seed 7] [--force]
                             [--budget_minutes M]

Trains --num_models models of the config's architecture and recipe, each for --epochs epochs (the
config's by default; no early stopping, there is no dev set) on a random subset of the training set,
records which training samples each model gets right, and writes
mem_i = P[correct on i | i in subset] - P[correct on i | i not in subset]
to memscore/memscore_<dataset>_<model>.csv in the authors' format, with the fingerprint of the
training set it scores in memscore/memscore_<dataset>_<model>.json (written first; see memscores.py).
memscore/ is the repo's, whatever the working directory (paths.py), where the other scripts look.

Before training it refuses a --num_models that leaves a sample without both an in and an out model in
this seed's subset draw (naming the smallest count that passes), prints the plan, times the first epoch
and prints what the whole run will take, then a line at every tenth of the models. --budget_minutes M
instead picks the largest models x epochs (at most --num_models x --epochs) that fit in M minutes at the
measured epoch time, for a first look: the scores equal those of a run with the picked --num_models and
--epochs (docs/defenses.md: mem-scores on a budget says what fewer models or epochs cost).
"""

import datetime
import itertools
import math
import os
import time

import pandas as pd
import torch

from common import DivergedError, UsageError, base_parser, main_guard, parse_args, pick_device, seed_everything
from datasets import get_dataset, split_source
from memscores import fingerprint, sidecar_path, write_with_sidecar
from models import build_model
from paths import memscore_path
from progress import Progress
from splits import check_config
from train import make_optimizer, predict, train_pass


def get_args(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--num_models", type=int, default=100, help="models to train (K)")
    parser.add_argument("--subset_ratio", type=float, default=0.7, help="fraction of the training set each model sees")
    parser.add_argument("--force", action="store_true", help="overwrite an existing mem-score file")
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=None,
        help="pick the largest models x epochs (up to --num_models x --epochs) that fit in this time",
    )
    args = parse_args(parser, argv)
    if not 0 < args.subset_ratio < 1:
        raise UsageError(f"--subset_ratio must be in (0, 1), got {args.subset_ratio}")
    if args.num_models < 2 or args.epochs < 1:
        raise UsageError("--num_models must be >= 2 and --epochs >= 1")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise UsageError(f"--budget_minutes must be > 0, got {args.budget_minutes}")
    return args


MAX_MODELS = 10_000  # how far smallest_passing looks


def subset_rows(n, ratio, seed):
    """Endless (n,) bool rows, row k marking the int(ratio * n) samples model k trains on; the first K rows
    are the same whatever K, so a run's subsets are a prefix of a larger run's."""
    generator = torch.Generator().manual_seed(seed)
    size = int(ratio * n)
    while True:
        row = torch.zeros(n, dtype=torch.bool)
        row[torch.randperm(n, generator=generator)[:size]] = True
        yield row


def draw_subsets(n, num_models, ratio, seed):
    """(num_models, n) bool: row k marks the int(ratio * n) samples model k trains on."""
    rows = list(itertools.islice(subset_rows(n, ratio, seed), num_models))
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.bool)


def smallest_passing(n, ratio, seed, limit=MAX_MODELS):
    """The smallest model count whose subsets (this seed's draw) give every sample an in and an out model;
    None when even `limit` models do not."""
    ins = torch.zeros(n, dtype=torch.int64)
    for k, row in enumerate(itertools.islice(subset_rows(n, ratio, seed), limit), start=1):
        ins += row
        if k >= 2 and bool(((ins > 0) & (ins < k)).all()):
            return k
    return None


def check_coverage(masks, ratio=None, seed=None):
    """Every sample needs at least one model that trained on it and one that did not; the refusal names the
    smallest model count that passes for this draw (ratio and seed given)."""
    num_models, n = masks.shape
    ins = masks.sum(0)
    lacking = int(((ins == 0) | (ins == num_models)).sum())
    if lacking:
        fix = "raise --num_models"
        if ratio is not None:
            smallest = smallest_passing(n, ratio, seed)
            fix = (
                f"the smallest --num_models that passes with --subset_ratio {ratio} and --seed {seed} is "
                + (f"{smallest}" if smallest else f"above {MAX_MODELS}")
                + ("" if ratio == 0.5 else ", fewer with a --subset_ratio nearer 0.5")
            )
        raise UsageError(
            f"--num_models {num_models} leaves {lacking} of {n} samples without both an in and an "
            f"out model; {fix} (a sample lacks one with probability r^K + (1-r)^K)"
        )


def pick_budget(epochs_in_budget, min_models, max_models, max_epochs):
    """(models, epochs) for a budget of `epochs_in_budget` training epochs: as many models as epochs each
    (the default run's 100 x 100 shape), at least min_models, at most max_models x max_epochs, and then
    whichever of the two can still grow; None when min_models x 1 epoch does not fit."""
    if epochs_in_budget < min_models:
        return None
    models = min(max_models, max(min_models, math.isqrt(int(epochs_in_budget))))
    epochs = min(max_epochs, int(epochs_in_budget // models))
    models = min(max_models, max(models, int(epochs_in_budget // epochs)))
    return models, epochs


def minutes(seconds):
    """A duration as a person reads it: 42s, 3.5 min."""
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def correct_after_training(args, data, subset, after_epoch=lambda epoch: None):
    """Train one model on data[subset] for args.epochs; bool per sample of data: predicted its label.
    after_epoch(epoch) is called after each epoch (args.epochs is read again after the first)."""
    model = build_model(args.model_name, args.num_cls, args.input_dim).to(data.y.device)
    optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)
    epoch = 0
    while epoch < args.epochs:
        loss, _ = train_pass(model, data, subset, optimizer, args.batch_size)
        if not math.isfinite(loss):  # a diverged model gets nothing right: its scores would be noise
            raise DivergedError(
                f"training diverged: the loss of epoch {epoch} is {loss}; nothing was written; lower --lr"
            )
        after_epoch(epoch)
        epoch += 1
    everyone = torch.arange(len(data), device=data.y.device)
    return (predict(model, data, everyone).argmax(1) == data.y).cpu()


def memorization(correct, masks):
    """mem_i = mean of correct[:, i] over models with i in the subset - mean over models without it."""
    correct, masks = correct.double(), masks.double()
    in_rate = (correct * masks).sum(0) / masks.sum(0)
    out_rate = (correct * (1 - masks)).sum(0) / (1 - masks).sum(0)
    return in_rate - out_rate


def warm_up(args, data, subset):
    """One batch of training on a throwaway model, leaving the RNGs as they were: the first optimizer step
    of a process loads code for seconds, which would swamp the first epoch's time."""
    devices = [data.y.device] if data.y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model = build_model(args.model_name, args.num_cls, args.input_dim).to(data.y.device)
        optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)
        train_pass(model, data, subset[: args.batch_size], optimizer, args.batch_size)


class Plan:
    """The run's size and cost: prints the plan, times the first epoch, picks the budget's models x epochs
    (args.budget_minutes; it sets args.num_models and args.epochs), and says how long the rest will take."""

    def __init__(self, args, n, min_models, say=print, timer=time.perf_counter):
        self.args, self.n, self.min_models, self.say, self.timer = args, n, min_models, say, timer
        self.budget = getattr(args, "budget_minutes", None)
        self.start = self.epoch_start = timer()
        self.epoch_s = None
        size = int(args.subset_ratio * n)
        up_to = "up to " if self.budget else ""
        self.say(
            f"Plan: {up_to}{args.num_models} models x {up_to}{args.epochs} epochs, each on {size} of {n} "
            f"training samples (--subset_ratio {args.subset_ratio}): {up_to}{args.num_models * args.epochs} "
            f"training epochs" + (f", within {self.budget:g} min" if self.budget else "")
        )

    def first_epoch_done(self):
        """Called after model 0's first epoch."""
        args = self.args
        self.epoch_s = self.timer() - self.epoch_start
        if self.budget:
            full = args.num_models * args.epochs
            picked = pick_budget(self.budget * 60 / self.epoch_s, self.min_models, args.num_models, args.epochs)
            if picked is None:
                raise UsageError(
                    f"--budget_minutes {self.budget:g} is too short: an epoch takes "
                    f"{self.epoch_s:.3f}s and the smallest run that passes the coverage check "
                    f"({self.min_models} models x 1 epoch) needs "
                    f"{minutes(self.min_models * self.epoch_s)}; nothing was written"
                )
            args.num_models, args.epochs = picked
            self.say(
                f"Budget {self.budget:g} min at {self.epoch_s:.3f}s per epoch: picked --num_models "
                f"{args.num_models} --epochs {args.epochs} ({args.num_models * args.epochs} epochs, about "
                f"{minutes(args.num_models * args.epochs * self.epoch_s)}; the full {full} epochs would "
                f"take about {minutes(full * self.epoch_s)})"
            )
        else:
            total = args.num_models * args.epochs
            self.say(
                f"First epoch: {self.epoch_s:.3f}s, so {total} epochs take about {minutes(total * self.epoch_s)} "
                f"(ETA {self.eta(total * self.epoch_s)})"
            )

    def eta(self, seconds):
        return (datetime.datetime.now() + datetime.timedelta(seconds=seconds)).strftime("%H:%M")

    def model_done(self, k):
        """Called after model k (0-based); a line at every tenth of the models but the last."""
        models = self.args.num_models
        every = max(1, models // 10)
        if (k + 1) % every == 0 and k + 1 < models:
            spent = self.timer() - self.start
            left = spent / (k + 1) * (models - k - 1)
            self.say(f"{k + 1}/{models} models in {minutes(spent)}, about {minutes(left)} left (ETA {self.eta(left)})")


def estimate(args, data, progress=Progress(), say=lambda line: None, timer=time.perf_counter):
    """Mem-scores (float64, one per sample of data) from args.num_models subset-trained models; the same
    for the same args.seed. With args.budget_minutes, args.num_models and args.epochs are first lowered to
    what fits (Plan); the scores are then those of a run with these values. say(line): the plan and ETA lines."""
    seed_everything(args.seed)
    n = len(data)
    masks = draw_subsets(n, args.num_models, args.subset_ratio, args.seed)
    smallest = smallest_passing(n, args.subset_ratio, args.seed, args.num_models)
    if smallest is None:  # coverage only grows with the models: --num_models (a budget's cap) is too few
        check_coverage(masks, args.subset_ratio, args.seed)
    warm_up(args, data, masks[0].nonzero().squeeze(1).to(data.y.device))
    plan = Plan(args, n, smallest, say, timer)
    after_epoch = lambda epoch: plan.first_epoch_done() if plan.epoch_s is None else None
    correct = torch.zeros_like(masks)
    bar = progress.bar(total=args.num_models * args.epochs, desc="mem-score epochs", unit="epoch")
    k = 0
    while k < args.num_models:  # a budget lowers args.num_models after the first epoch
        subset = masks[k].nonzero().squeeze(1).to(data.y.device)
        correct[k] = correct_after_training(args, data, subset, lambda e: (after_epoch(e), bar.update()))
        if k == 0:
            bar.total = args.num_models * args.epochs
        plan.model_done(k)
        k += 1
    bar.close()
    masks, correct = masks[: args.num_models], correct[: args.num_models]
    check_coverage(masks, args.subset_ratio, args.seed)  # holds by construction; a cheap guard on the budget
    return memorization(correct, masks)


def write_memscores(path, scores, fields):
    """The authors' format (pandas CSV, default index, one column named 0) and its sidecar, which holds
    fields (memscores.fingerprint of the training set) and the CSV's hash."""
    write_with_sidecar(path, pd.DataFrame(scores.numpy()).to_csv().encode(), fields)


def main():
    args = get_args()
    check_config(args)
    path = memscore_path(args.dataset_name, args.model_name)
    if os.path.exists(path) and not args.force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it (or move it away first)")
    device = pick_device(args.gpu_id)
    train = get_dataset(args.dataset_name)[0]
    fields = fingerprint(args.dataset_name, args.model_name, train.x, train.y, split_source(args.dataset_name))
    data = train.to(device, amp=args.amp)
    start = time.time()
    scores = estimate(args, data, Progress(args.quiet), say=print)
    write_memscores(path, scores, fields)
    print(
        f"Wrote {path} and its fingerprint {sidecar_path(path)}: {len(scores)} scores from {args.num_models} "
        f"models x {args.epochs} epochs in {time.time() - start:.1f}s (mean {scores.mean():.3f}, "
        f"{int((scores >= 0.5).sum())} samples >= 0.5)"
    )


if __name__ == "__main__":
    main_guard(main)
