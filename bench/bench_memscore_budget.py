"""Mem-scores on a budget: how close the scores of fewer models / epochs come to the shipped digits
scores (100 models x 100 epochs, memscore/memscore_digits_columnfc.csv), by Spearman correlation and by
how many of the full run's high scores (>= 0.3) the budget run also puts >= 0.3.

OMP_NUM_THREADS=1 python bench/bench_memscore_budget.py [--budgets 25x10,50x25,...] [--seed 7]
"""

import argparse
import time

import pandas as pd
import torch
from scipy.stats import spearmanr

from common_bench import table

import compute_memscore
from datasets import get_dataset
from paths import memscore_path

BUDGETS = "25x10,25x25,50x25,25x50,50x50,100x25,25x100"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default=BUDGETS, help="models x epochs, comma separated")
    parser.add_argument("--seed", type=int, default=7)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    full = torch.tensor(pd.read_csv(memscore_path("digits", "columnfc"), index_col=0)["0"].to_numpy())
    high = full >= 0.3
    data = get_dataset("digits")[0]
    rows = []
    for budget in opts.budgets.split(","):
        models, epochs = budget.split("x")
        args = compute_memscore.get_args(
            ["-1", "config/digits.json", "--num_models", models, "--epochs", epochs, "--seed", str(opts.seed)]
        )
        start = time.perf_counter()
        scores = compute_memscore.estimate(args, data)
        seconds = time.perf_counter() - start
        rho = spearmanr(scores.numpy(), full.numpy()).statistic
        kept = int((scores[high] >= 0.3).sum())
        rows.append(
            [
                models,
                epochs,
                int(models) * int(epochs),
                f"{seconds:.1f}",
                f"{rho:.3f}",
                f"{kept}/{int(high.sum())}",
                int((scores >= 0.3).sum()),
            ]
        )
        print(rows[-1], flush=True)
    table(
        "digits mem-scores on a budget vs the shipped 100 x 100 run",
        ["models", "epochs", "model-epochs", "seconds", "spearman", "full>=0.3 kept", "budget>=0.3"],
        rows,
    )


if __name__ == "__main__":
    main()
