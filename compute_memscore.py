"""Mem-scores of a config's training set with the subsampled estimator of Feldman & Zhang (2020).

python compute_memscore.py GPU-ID CONFIG [--num_models 100] [--subset_ratio 0.7] [--epochs E] [--seed 7] [--force]

Trains --num_models models of the config's architecture and recipe, each for --epochs epochs (the
config's by default; no early stopping, there is no dev set) on a random subset of the training set,
records which training samples each model gets right, and writes
mem_i = P[correct on i | i in subset] - P[correct on i | i not in subset]
to memscore/memscore_<dataset>_<model>.csv in the authors' format, with the fingerprint of the
training set it scores in memscore/memscore_<dataset>_<model>.json (written first; see memscores.py).
memscore/ is the repo's, whatever the working directory (paths.py), where the other scripts look.
"""
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
    args = parse_args(parser, argv)
    if not 0 < args.subset_ratio < 1:
        raise UsageError(f"--subset_ratio must be in (0, 1), got {args.subset_ratio}")
    if args.num_models < 2 or args.epochs < 1:
        raise UsageError("--num_models must be >= 2 and --epochs >= 1")
    return args


def draw_subsets(n, num_models, ratio, seed):
    """(num_models, n) bool: row k marks the int(ratio * n) samples model k trains on."""
    generator = torch.Generator().manual_seed(seed)
    size = int(ratio * n)
    masks = torch.zeros(num_models, n, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n, generator=generator)[:size]] = True
    return masks


def check_coverage(masks):
    """Every sample needs at least one model that trained on it and one that did not."""
    num_models, n = masks.shape
    ins = masks.sum(0)
    lacking = int(((ins == 0) | (ins == num_models)).sum())
    if lacking:
        raise UsageError(f"--num_models {num_models} leaves {lacking} of {n} samples without both an in and an "
                         f"out model; raise --num_models (a sample lacks one with probability r^K + (1-r)^K)")


def correct_after_training(args, data, subset):
    """Train one model on data[subset] for args.epochs; bool per sample of data: predicted its label."""
    model = build_model(args.model_name, args.num_cls, args.input_dim).to(data.y.device)
    optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)
    for epoch in range(args.epochs):
        loss, _ = train_pass(model, data, subset, optimizer, args.batch_size)
        if not math.isfinite(loss):  # a diverged model gets nothing right: its scores would be noise
            raise DivergedError(f"training diverged: the loss of epoch {epoch} is {loss}; nothing was written; "
                                f"lower --lr")
    everyone = torch.arange(len(data), device=data.y.device)
    return (predict(model, data, everyone).argmax(1) == data.y).cpu()


def memorization(correct, masks):
    """mem_i = mean of correct[:, i] over models with i in the subset - mean over models without it."""
    correct, masks = correct.double(), masks.double()
    in_rate = (correct * masks).sum(0) / masks.sum(0)
    out_rate = (correct * (1 - masks)).sum(0) / (1 - masks).sum(0)
    return in_rate - out_rate


def estimate(args, data, progress=Progress()):
    """Mem-scores (float64, one per sample of data) from args.num_models subset-trained models; the same
    for the same args.seed."""
    seed_everything(args.seed)
    masks = draw_subsets(len(data), args.num_models, args.subset_ratio, args.seed)
    check_coverage(masks)
    correct = torch.zeros_like(masks)
    for k in progress.bar(range(args.num_models), desc="mem-score models", unit="model"):
        subset = masks[k].nonzero().squeeze(1).to(data.y.device)
        correct[k] = correct_after_training(args, data, subset)
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
    scores = estimate(args, data, Progress(args.quiet))
    write_memscores(path, scores, fields)
    print(f"Wrote {path} and its fingerprint {sidecar_path(path)}: {len(scores)} scores from {args.num_models} "
          f"models in {time.time() - start:.1f}s (mean {scores.mean():.3f}, "
          f"{int((scores >= 0.5).sum())} samples >= 0.5)")


if __name__ == "__main__":
    main_guard(main)
