"""Collect the prune/attack logs into one results table (CSV, Markdown) and a privacy-utility plot.

    python summarize.py [LOG_DIR] [--out results.csv] [--markdown] [--plot FILE.png] [--all]

Reads LOG_DIR/<dataset>_<model>/<pruner>_<sparsity>_<defend>.txt (spec sections 8 and 10).
"""
import argparse
import math
import os
import re
import sys

import pandas as pd

ATTACKS = ["SAMIA", "Conf", "Entr", "Mentr", "Hconf", "NN", "Top3-NN", "NNCl", "LiRA"]
METRICS = {"accuracy": "acc", "AUC": "auc", "TPR@1%FPR": "tpr1", "TPR@0.1%FPR": "tpr01"}
ARG_DEFENSES = {"ppb", "adv", "dp", "relaxloss"}
KEY = ["dataset", "model", "pruner", "sparsity", "defense", "defend_arg", "window",
       "weight_decay_mem", "setting"]
COLUMNS = KEY + ["pretrained_acc", "pruned_acc", "defend_time_s", "dp_epsilon"]

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
FILE_RE = re.compile(r"^(.+?)_(\d*\.?\d+)(?:_(.*))?$")
# Lines are matched anywhere, so the release's "2024-01-01 ... - INFO - " prefixes do not matter.
ATTACK_RE = re.compile(r"(?<![\w-])([A-Za-z][\w-]*) attack (accuracy|AUC|TPR@1%FPR|TPR@0\.1%FPR): " + NUM)
VICTIM_RE = re.compile(r"Victim (pruned|original) model test accuracy: " + NUM)
SHADOWS_RE = re.compile(r"Shadows: (.*)$")
PRETRAINED_RE = re.compile(r"Pretrained Victim: Accuracy " + NUM)
DEFEND_TIME_RE = re.compile(r"Total \S+ defend time: " + NUM + "s")
EPSILON_RE = re.compile(r"DP epsilon: " + NUM)
SHADOW_ITER_RE = re.compile(r"shadow \d+ iter \d+ best model")


def header_re(pruner):
    # <ds>_<model>_<pruner>_<sparsity>[_<defend>[_<arg>]][_<stride>-<width>]_<weight_decay_mem>
    return re.compile(r"(?:^|\s)\S+_" + re.escape(pruner) + r"_\d*\.?\d+(?:_(\S+?))?_" + NUM + r"\s*$")


def parse_header(match, defense):
    info = {"weight_decay_mem": float(match.group(2))}
    for token in (match.group(1) or "").split("_"):
        if re.fullmatch(r"\d+-\d+", token):
            info["window"] = token
        elif defense in ARG_DEFENSES and re.fullmatch(NUM, token):
            info["defend_arg"] = float(token)
    return info


def parse_file(path, dataset, model):
    """Rows of one log file, oldest first: one per attack block, or one per prune block without any."""
    pruner, sparsity, defense = FILE_RE.match(os.path.basename(path)[:-4]).groups()
    config = {"dataset": dataset, "model": model, "pruner": pruner, "sparsity": float(sparsity),
              "defense": defense or "base"}  # the release writes Base as an empty defend
    find_header = header_re(pruner)
    blocks = []  # prune blocks: {"info": {...}, "attacks": [{...}], ...}

    def new_block():
        blocks.append({"info": {}, "attacks": [], "in_shadows": False, "late_eps": None})
        return blocks[-1]

    def new_attack(block, setting="unknown"):
        block["attacks"].append({"setting": setting})
        return block["attacks"][-1]

    block, attack = None, None
    with open(path, errors="replace") as f:
        for line in f:
            if m := ATTACK_RE.search(line):
                block = block or new_block()
                column = f"{m.group(1)}_{METRICS[m.group(2)]}"
                if attack is None or column in attack:  # a repeated metric starts a new run
                    attack = new_attack(block)
                attack[column] = float(m.group(3))
            elif m := VICTIM_RE.search(line):
                block = block or new_block()
                attack = new_attack(block, "original" if m.group(1) == "original" else "unknown")
                attack["victim_acc"] = float(m.group(2))
            elif m := SHADOWS_RE.search(line):
                block = block or new_block()
                attack = attack or new_attack(block)
                text = m.group(1).strip()
                attack["setting"] = ("original" if text == "original" else "adaptive" if text.endswith("(adaptive)")
                                     else "base" if text.endswith("(base)") else "unknown")
            elif m := PRETRAINED_RE.search(line):
                if block is None or "pretrained_acc" in block["info"] or block["attacks"]:
                    block = new_block()  # a run without a header line
                block["info"]["pretrained_acc"] = float(m.group(1))
                attack = None
            elif m := DEFEND_TIME_RE.search(line):
                block = block or new_block()
                block["info"]["defend_time_s"] = float(m.group(1))
            elif m := EPSILON_RE.search(line):
                block = block or new_block()
                # The victim's epsilon is the last one before the shadows train; later ones are a fallback.
                if block["in_shadows"]:
                    block["late_eps"] = float(m.group(1))
                else:
                    block["info"]["dp_epsilon"] = float(m.group(1))
            elif SHADOW_ITER_RE.search(line):
                if block is not None:
                    block["in_shadows"] = True
            elif m := find_header.search(line):
                block, attack = new_block(), None
                block["info"].update(parse_header(m, config["defense"]))

    rows = []
    for block in blocks:
        info = dict(block["info"])
        if "dp_epsilon" not in info and block["late_eps"] is not None:
            info["dp_epsilon"] = block["late_eps"]
        for attack in block["attacks"] or [{"setting": None}]:
            row = {**config, **info, **attack}
            victim_acc = row.pop("victim_acc", math.nan)
            if row["setting"] == "original":  # the attacked model is the unpruned one
                row["pretrained_acc"] = victim_acc
            else:
                row["pruned_acc"] = victim_acc
            rows.append(row)
    return rows


def log_files(log_dir):
    """(path, dataset, model) of every results log, oldest modification first."""
    found = []
    for folder in sorted(os.listdir(log_dir)):
        sub = os.path.join(log_dir, folder)
        if folder == "tb" or not os.path.isdir(sub):
            continue
        dataset, _, model = folder.partition("_")
        for name in sorted(os.listdir(sub)):
            path = os.path.join(sub, name)
            if not name.endswith(".txt") or name == "pretrain.txt" or not os.path.isfile(path):
                continue
            if not FILE_RE.match(name[:-4]):
                print(f"skipping {path}: name is not <pruner>_<sparsity>_<defend>.txt", file=sys.stderr)
                continue
            found.append((path, dataset, model))
    return sorted(found, key=lambda item: os.path.getmtime(item[0]))  # stable: ties keep name order


def parse_logs(log_dir, newest_only=True):
    """One DataFrame of all results; with newest_only, the last entry per configuration."""
    rows = [row for path, ds, model in log_files(log_dir) for row in parse_file(path, ds, model)]
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(COLUMNS + [k for r in rows for k in r])))
    df = df.astype({c: float for c in df.columns if c not in ("dataset", "model", "pruner", "defense",
                                                                "window", "setting")})
    if newest_only:
        df = df.drop_duplicates(KEY, keep="last")
    seen = {c.rsplit("_", 1)[0] for c in df.columns[len(COLUMNS):]}
    names = [a for a in ATTACKS if a in seen] + sorted(seen - set(ATTACKS))
    attack_cols = [f"{a}_{m}" for a in names for m in METRICS.values()
                   if f"{a}_{m}" in df.columns and df[f"{a}_{m}"].notna().any()]
    df = df[COLUMNS + attack_cols]
    order = lambda col: col.where(col != "base", "") if col.name == "defense" else col  # Base first
    return df.sort_values(KEY, key=order, kind="stable", na_position="first").reset_index(drop=True)


def to_markdown(df):
    cell = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def plot(df, path):
    """Privacy-utility trade-off: pruned test accuracy vs strongest attack, one subplot per dataset_model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_cols = [c for c in df.columns if c.endswith("_acc") and c not in ("pretrained_acc", "pruned_acc")]
    df = df.assign(attack=df[acc_cols].max(axis=1) if acc_cols else math.nan,
                   group=df["dataset"] + "_" + df["model"])
    groups = list(dict.fromkeys(df["group"])) or ["no results"]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    defenses = sorted(set(df["defense"]) - {"base"})
    markers = "osD^vP<>hp"
    for ax, group in zip(axes.flat, groups):
        g = df[df["group"] == group]
        pruned = g[(g["setting"] != "original") & g["pruned_acc"].notna() & g["attack"].notna()]
        for defense, d in pruned.groupby("defense", sort=False):
            if defense == "base":
                style = dict(marker="*", s=160, color="black", zorder=3, label="Base")
            else:
                i = defenses.index(defense)
                style = dict(marker=markers[i % len(markers)], color=f"C{i % 10}", s=50, label=defense)
            ax.scatter(d["pruned_acc"], d["attack"], **style)
            for x, y, arg in zip(d["pruned_acc"], d["attack"], d["defend_arg"]):
                if not math.isnan(arg):
                    ax.annotate(f"{arg:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        original = g[g["setting"] == "original"]
        ref = original["pretrained_acc"].dropna()
        ref = ref if len(ref) else g["pretrained_acc"].dropna()
        if len(ref):
            ax.axvline(ref.iloc[-1], color="grey", linestyle="--", label=f"unpruned ({ref.iloc[-1]:.1f}%)")
        original = original[original["attack"].notna() & original["pretrained_acc"].notna()]
        if len(original):
            ax.scatter(original["pretrained_acc"], original["attack"], marker="X", s=90, color="grey",
                       label="unpruned, attacked")
        ax.set_title(group)
        ax.set_xlabel("pruned victim test accuracy (%)")
        ax.set_ylabel("strongest attack accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Summarize prune/attack logs into one table.")
    parser.add_argument("log_dir", nargs="?", default="log")
    parser.add_argument("--out", default="results.csv", help="CSV file to write")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table to stdout")
    parser.add_argument("--plot", metavar="FILE.png", nargs="?", const="tradeoff.png",
                        help="write the privacy-utility plot (default file: tradeoff.png)")
    parser.add_argument("--all", action="store_true", help="keep every entry, not only the newest per config")
    args = parser.parse_args()
    if not os.path.isdir(args.log_dir):
        sys.exit(f"error: log directory {args.log_dir} not found; pass the folder prune_modi.py/mia_modi.py log to")
    df = parse_logs(args.log_dir, newest_only=not args.all)
    if df.empty:
        sys.exit(f"error: no results logs (<ds>_<model>/<pruner>_<sparsity>_<defend>.txt) under {args.log_dir}")
    df.to_csv(args.out, index=False)
    print(f"wrote {len(df)} rows to {args.out}", file=sys.stderr)
    if args.markdown:
        print(to_markdown(df))
    if args.plot:
        plot(df, args.plot)
        print(f"wrote plot to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
