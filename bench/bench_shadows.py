"""Many shadows on digits: wall time and peak memory of pretrain, prune (Base) and the LiRA + RMIA attack,
and LiRA's and RMIA's AUC and TPR@0.1%FPR against the number of shadows (figure docs/shadows_digits.png).

One pretrain and one prune with the largest count serve every count: shadow i's split uses random_state
seed + i and its training seed + 1 + i, so the attack with --shadow_num k reads shadows 0..k-1 of that run
(checked below: the logged LiRA scores equal LiRA recomputed here from shadows 0..k-1). It also prints LiRA
with a pooled and with per-sample variances at every count, which sets LIRA_PER_SAMPLE_VAR_MIN.

python bench/bench_shadows.py [--workdir DIR [--reuse]] [--counts 2,4,8,16,32,64] [--figure docs/shadows_digits.png]

Without --workdir it runs in a temporary copy of the repo; --reuse attacks the models already in DIR
(made by an earlier run of this script) instead of pretraining and pruning again.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common_bench import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "./config/digits.json"
PRUNE = ["--pruner_name", "iter_prunetxt", "--prune_sparsity", "0.6"]
LOG = "log/digits_columnfc/iter_prunetxt_0.6_base.txt"


def copy_repo(target):
    keep = lambda d, names: [n for n in names if n in ("result", "log", ".git", "__pycache__")]
    shutil.copytree(REPO, target, ignore=keep)


def timed(command, workdir):
    """(wall seconds, peak RSS in MiB) of one script run, the child's own (wait4), niced."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    child = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, *command, "--quiet"], cwd=workdir, env=env, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed with exit code {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def last_block(workdir):
    """The newest attack block of the Base log: {line name: value} of the LiRA and RMIA lines."""
    with open(os.path.join(workdir, LOG)) as f:
        lines = f.read().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Victim pruned model test accuracy"))
    values = {}
    for line in lines[start:]:
        if line.startswith(("LiRA attack", "RMIA attack")):
            key, value = line.rsplit(": ", 1)
            values[key] = float(value)
        elif line.startswith("RMIA a: "):
            values["RMIA a"] = float(line.split()[2])
        elif line.startswith("Scores: "):
            values["scores"] = os.path.join(workdir, line.removeprefix("Scores: "))
    return values


def lira_both_ways(workdir, counts):
    """{k: (pooled AUC, TPR@0.1%FPR, per-sample AUC, TPR@0.1%FPR, default-rule scores)} from the pruned models."""
    from attacks import attacked_rows, lira_scores, logit_confidence, roc_metrics
    from datasets import TensorData, get_dataset
    from models import build_model
    from paths import checkpoint, pruned_dir
    from splits import Split
    from train import load_checkpoint, predict

    cwd = os.getcwd()
    os.chdir(workdir)
    try:

        class Args:  # what paths.py reads to name the run's folders
            dataset_name, model_name, tag, seed = "digits", "columnfc", "", 7

        split = Split.load(os.path.join("result", "digits_columnfc", "split.npz"))
        train, test = get_dataset("digits")
        data = TensorData.concat(train, test)
        rows = attacked_rows(split.indices())
        member = np.arange(len(rows)) < len(split.indices().train)

        def log_odds(shadow=None):
            model = build_model("columnfc", 10, 64)
            load_checkpoint(model, checkpoint(pruned_dir(Args, "iter_prunetxt_0.6", shadow)), "checkpoint", "")
            return logit_confidence(predict(model, data, rows), data.y[rows])

        victim = log_odds()
        shadows = torch.stack([log_odds(i) for i in range(max(counts))])
    finally:
        os.chdir(cwd)
    out = {}
    for k in counts:
        pooled, per_sample = (lira_scores(shadows[:k], victim, per_sample=p).numpy() for p in (False, True))
        (auc_p, tpr_p), (auc_s, tpr_s) = roc_metrics(pooled, member), roc_metrics(per_sample, member)
        out[k] = (auc_p, tpr_p[0.001], auc_s, tpr_s[0.001], lira_scores(shadows[:k], victim).numpy())
    return out


def figure(path, counts, measured, nonmembers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, marker in (("LiRA", "o"), ("RMIA", "s")):
        left.plot(counts, [measured[k][f"{name} attack AUC"] for k in counts], marker=marker, label=name)
        right.plot(counts, [measured[k][f"{name} attack TPR@0.1%FPR"] for k in counts], marker=marker, label=name)
    right.set_title(f"{nonmembers} non-members: 0.1% FPR is 0 false positives", fontsize=9)
    for ax, label in ((left, "AUC"), (right, "TPR at 0.1% FPR (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.set_xlabel("shadow (reference) models")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle("digits, pruned Base victim (iter_prunetxt 0.6), offline LiRA and RMIA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", help="a copy of the repo to run in (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="attack the models already pruned in --workdir")
    parser.add_argument("--counts", default="2,4,8,16,32,64")
    parser.add_argument("--figure", default=None, help="write the AUC / TPR figure here (e.g. docs/shadows_digits.png)")
    args = parser.parse_args()
    counts = sorted(int(k) for k in args.counts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or os.path.join(tmp, "repo")
        if not os.path.isdir(workdir):
            copy_repo(workdir)
        steps = []
        if not args.reuse:
            flags = ["--shadow_num", str(max(counts))]
            steps.append((f"pretrain {max(counts)}", *timed(["pretrain_modi.py", "-1", CONFIG, *flags], workdir)))
            steps.append(
                (
                    f"prune {max(counts)}",
                    *timed(["prune_modi.py", "-1", CONFIG, *PRUNE, "--prune_iter", "5", *flags], workdir),
                )
            )
        measured = {}
        for k in counts:
            command = ["mia_modi.py", "-1", CONFIG, *PRUNE, "--attacks", "lira,rmia", "--shadow_num", str(k)]
            steps.append((f"attack lira,rmia {k}", *timed(command, workdir)))
            measured[k] = last_block(workdir)
        lira = lira_both_ways(workdir, counts)
    for k in counts:
        with np.load(measured[k]["scores"], allow_pickle=False) as z:
            same = np.allclose(z["score_LiRA"], lira[k][4], rtol=1e-9, atol=1e-9)
            nonmembers = int((~z["member"]).sum())
        if not same:
            raise SystemExit(f"error: the attack with --shadow_num {k} did not use shadows 0..{k - 1}")
    table(
        "wall time and peak memory (digits, CPU, OMP_NUM_THREADS=1)",
        ["step", "seconds", "peak RSS MiB"],
        [(name, f"{s:.1f}", f"{m:.0f}") for name, s, m in steps],
    )
    table(
        "attack metrics against the number of shadows (pruned Base victim; LiRA scores checked: shadows 0..k-1)",
        ["shadows", "LiRA AUC", "LiRA TPR@0.1%", "RMIA AUC", "RMIA TPR@0.1%", "RMIA a", "RMIA acc", "LiRA acc"],
        [
            (
                k,
                f"{m['LiRA attack AUC']:.4f}",
                f"{m['LiRA attack TPR@0.1%FPR']:.3f}",
                f"{m['RMIA attack AUC']:.4f}",
                f"{m['RMIA attack TPR@0.1%FPR']:.3f}",
                f"{m['RMIA a']:g}",
                f"{m['RMIA attack accuracy']:.3f}",
                f"{m['LiRA attack accuracy']:.3f}",
            )
            for k, m in measured.items()
        ],
    )
    table(
        "LiRA variance: pooled over samples vs per sample",
        ["shadows", "pooled AUC", "pooled TPR@0.1%", "per-sample AUC", "per-sample TPR@0.1%"],
        [(k, f"{p:.4f}", f"{tp:.3f}", f"{s:.4f}", f"{ts:.3f}") for k, (p, tp, s, ts, _) in lira.items()],
    )
    if args.figure:
        figure(args.figure, counts, measured, nonmembers)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
