"""M ColumnFC digits models trained as one batched ensemble (ensemble.fit_ensemble) against one model at a
time with the project's own loop (train.fit + train_pass), with config/digits.json's training settings:
pretraining (adam, lr 1e-3, weight decay 5e-4, batch 128, up to 100 epochs, early_stop 5 as pretrain_modi.py),
then Base fine-tuning under iterative pruning as prune_modi.py runs it (iter_prunetxt to 0.6 in 5 iterations
of up to 21 epochs, early_stop 5, the release's start_acc 0; Pruner and defenses.Base one model at a time).

Every model trains on its own random half of digits' 539 training rows (269 rows, as the audit gives each
model half of the pool) and is selected on the same 427 dev rows of the test set. The one-model loop gets a
one-row test set: train.fit evaluates a test set every epoch for its curves, which the ensemble does not,
so both arms evaluate the same rows. Both arms start from the same weights and seeds; the script prints how
far apart they end (float rounding, but for the rare model whose path a ReLU input at zero splits:
see docs/performance.md).

python bench/bench_ensemble.py [--models 32] [--threads 1] [--repeat 2] [--tiny]

Measured numbers, and what they mean: docs/performance.md#many-models-as-one-ensemble (on this 2-core
machine: 1.3-1.4x for pretraining, 1.1-1.4x for Base pruning with one thread).
"""

import argparse
import copy
import json
import os
import time

import torch

from common_bench import table

from auditing.ensemble import EnsembleOptimizer, fit_ensemble
from datasets import TensorData, get_dataset
from defenses import Base, DefenseSettings
from models import build_model
from pruning import Pruner
from splits import ModelSplit
from train import fit, make_optimizer, train_pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, EARLY_STOP, PRUNER, SPARSITY = 128, 5, "iter_prunetxt", 0.6


def setup(count, seed=0):
    """(data, train index sets, dev rows, test rows, config, initial models)."""
    with open(os.path.join(REPO, "config", "digits.json")) as f:
        config = json.load(f)
    train, test = get_dataset("digits")
    data = TensorData.concat(train, test)
    g = torch.Generator().manual_seed(seed)
    train_idx = [torch.randperm(len(train), generator=g)[: len(train) // 2] for _ in range(count)]
    held = len(train) + torch.randperm(len(test), generator=g)
    dev, test_row = held[: int(0.34 * len(test))], held[-1:]
    torch.manual_seed(seed)
    models = [build_model("columnfc", config["num_cls"], config["input_dim"]) for _ in range(count)]
    return data, train_idx, dev, test_row, config, models


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrain_one_at_a_time(models, data, train_idx, dev, test_row, config, epochs):
    """pretrain_modi.pretrain per model (checkpoint kept in memory); returns each model's best epoch."""
    best_epochs = []
    for m, model in enumerate(models):
        torch.manual_seed(1000 + m)
        optimizer = make_optimizer(model.parameters(), config["optimizer"], config["lr"], config["weight_decay"])
        best = {}

        def on_best(epoch, acc, loss, model=model, best=best):
            best.update(epoch=epoch, state=state(model))

        def train_epoch(epoch, model=model, optimizer=optimizer, m=m):
            return train_pass(model, data, train_idx[m], optimizer, BATCH)

        fit(model, train_epoch, data, dev, test_row, epochs, EARLY_STOP, on_best)
        model.load_state_dict(best["state"])
        best_epochs.append(best["epoch"])
    return best_epochs


def pretrain_ensemble(models, data, train_idx, dev, config, epochs):
    gens = [torch.Generator().manual_seed(1000 + m) for m in range(len(models))]
    fits = fit_ensemble(
        models, data, train_idx, dev, epochs, BATCH, config["lr"], config["optimizer"], config["weight_decay"],
        gens, early_stop=EARLY_STOP,
    )  # fmt: skip
    return [f.best_epoch for f in fits]


def prune_one_at_a_time(models, data, train_idx, dev, test_row, config, iterations, epochs):
    """prune_modi.prune_one per model, Base, without files: returns each model's best epochs (one an iteration)."""
    settings = DefenseSettings(
        optimizer=config["optimizer"], lr=config["lr"], weight_decay=config["weight_decay"], batch_size=BATCH
    )
    best_epochs = []
    for m, model in enumerate(models):
        torch.manual_seed(2000 + m)
        pruner = Pruner(model, PRUNER, SPARSITY, iterations)
        base = Base(model, data, ModelSplit(train_idx[m], dev, test_row), settings)
        chosen = []
        for iteration in range(iterations):
            pruner.prune(iteration)
            best = {}
            fit(model, base.train_epoch, data, dev, test_row, epochs, EARLY_STOP,
                lambda epoch, acc, loss, best=best: best.update(epoch=epoch), start_acc=0.0)  # fmt: skip
            chosen.append(best.get("epoch", -1))
        best_epochs.append(chosen)
    return best_epochs


def prune_ensemble(models, data, train_idx, dev, config, iterations, epochs):
    pruners = [Pruner(model, PRUNER, SPARSITY, iterations) for model in models]  # for the masks only
    optimizer = EnsembleOptimizer(config["optimizer"], config["lr"], config["weight_decay"])
    gens = [torch.Generator().manual_seed(2000 + m) for m in range(len(models))]
    chosen = []
    for iteration in range(iterations):
        for pruner in pruners:
            pruner.prune(iteration)
        fits = fit_ensemble(
            models, data, train_idx, dev, epochs, BATCH, config["lr"], optimizer, config["weight_decay"], gens,
            [p.masks for p in pruners], EARLY_STOP, 0.0, restore_best=False,
        )  # fmt: skip
        chosen.append([f.best_epoch for f in fits])
    return [list(per_model) for per_model in zip(*chosen)]


def differences(a, b):
    """Each model pair's largest |weight difference|."""
    return [max((x - y).abs().max().item() for x, y in zip(state(p).values(), state(q).values())) for p, q in zip(a, b)]


def run_arm(train, start, repeat):
    """(fastest wall time, smallest CPU time, the last run's models, its result): each of `repeat` runs trains
    fresh copies of start. The CPU time (this process's, all threads) is the steadier number on a shared
    machine: other jobs lengthen the wall time much more."""
    walls, cpus = [], []
    for _ in range(repeat):
        models = [copy.deepcopy(model) for model in start]
        wall, cpu = time.perf_counter(), time.process_time()
        result = train(models)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), models, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per arm (the fastest is shown)")
    parser.add_argument("--tiny", action="store_true", help="3 models, a few epochs: to check the script runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count = 3 if args.tiny else args.models
    data, train_idx, dev, test_row, config, initial = setup(count)
    epochs = 3 if args.tiny else config["epochs"]
    iterations, prune_epochs = (2, 2) if args.tiny else (5, 21)
    arms = {
        "pretraining": (
            lambda models: pretrain_one_at_a_time(models, data, train_idx, dev, test_row, config, epochs),
            lambda models: pretrain_ensemble(models, data, train_idx, dev, config, epochs),
        ),
        "base_pruning": (
            lambda models: prune_one_at_a_time(
                models, data, train_idx, dev, test_row, config, iterations, prune_epochs
            ),
            lambda models: prune_ensemble(models, data, train_idx, dev, config, iterations, prune_epochs),
        ),
    }
    # untimed: the first calls pay one-time costs (library and kernel set-up)
    pretrain_one_at_a_time(copy.deepcopy(initial[:2]), data, train_idx[:2], dev, test_row, config, 1)
    pretrain_ensemble(copy.deepcopy(initial[:2]), data, train_idx[:2], dev, config, 1)
    rows, notes, start = [], [], initial
    for step, (one_at_a_time, ensemble) in arms.items():
        t_one, cpu_one, one_models, one_epochs = run_arm(one_at_a_time, start, args.repeat)
        t_ens, cpu_ens, ens_models, ens_epochs = run_arm(ensemble, start, args.repeat)
        rows.append([step, count, f"{t_one:.2f}", f"{t_ens:.2f}", f"{t_one / t_ens:.2f}"])
        rows[-1] += [f"{cpu_one:.2f}", f"{cpu_ens:.2f}", f"{cpu_one / cpu_ens:.2f}"]
        same = sum(a == b for a, b in zip(one_epochs, ens_epochs))
        apart = differences(one_models, ens_models)
        notes.append(
            f"{step}: best epochs (every iteration's) equal for {same}/{count} models; weights within 1e-4 for "
            f"{sum(d <= 1e-4 for d in apart)}/{count} (largest difference {max(apart):.1e})"
        )
        start = ens_models  # both pruning arms start from the same pretrained weights
    table(
        f"seconds (wall, then CPU), {count} ColumnFC digits models, {args.threads} thread(s), best of {args.repeat}",
        ["step", "models", "one_at_a_time", "ensemble", "speed-up", "cpu_one", "cpu_ensemble", "cpu_speed-up"],
        rows,
    )
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
