"""Collect the prune/attack logs into one results table (CSV, Markdown) and a privacy-utility plot.

    python summarize.py [LOG_DIR] [--out results.csv] [--markdown] [--plot FILE.png] [--all]

Reads LOG_DIR/<dataset>_<model>/<pruner>_<sparsity>_<defend>.txt, the log format of README: Reading
the results (the release's own logs too).
"""
import argparse
import math
import os
import re
import sys

import pandas as pd

from attacks import report_names
from defenses import DEFENSES
from paths import DEFAULT_SEED

ATTACKS = report_names()  # the attacks' log names, in log order
METRICS = {"accuracy": "acc", "AUC": "auc", "TPR@1%FPR": "tpr1", "TPR@0.1%FPR": "tpr01"}
ARG_DEFENSES = {name for name, cls in DEFENSES.items() if cls.arg_in_name}  # defend_arg is in their names
KEY = ["dataset", "model", "pruner", "sparsity", "defense", "defend_arg", "window",
       "weight_decay_mem", "setting", "semantics", "tag", "seed"]
COLUMNS = KEY + ["pretrained_acc", "pruned_acc", "defend_time_s", "dp_epsilon"]
TEXT_COLUMNS = ("dataset", "model", "pruner", "defense", "window", "setting", "semantics", "tag", "seed")  # not floats

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
FILE_RE = re.compile(r"^(.+?)_(\d*\.?\d+)(?:_(.*?))?(?:_tag-([A-Za-z0-9.-]+))?$")
FOLDER_RE = re.compile(r"^([^_]+)_(.+?)(?:_seed(\d+))?$")  # <ds>_<model>[_seed<k>]
# Lines are matched anywhere, so the release's "2024-01-01 ... - INFO - " prefixes do not matter.
ATTACK_RE = re.compile(r"(?<![\w-])([A-Za-z][\w-]*) attack (accuracy|AUC|TPR@1%FPR|TPR@0\.1%FPR): " + NUM)
# The release's NN lines: "NN attack accuracy 61.200", "Top3-NN Attack Accuracy 61.2" (no colon).
RELEASE_ACC_RE = re.compile(r"(?<![\w-])([A-Za-z][\w-]*) (?:attack accuracy|Attack Accuracy) " + NUM)
VICTIM_RE = re.compile(r"Victim (pruned|original) model test accuracy: " + NUM)
SHADOWS_RE = re.compile(r"Shadows: (.*)$")
SEMANTICS_RE = re.compile(r"Semantics: (\w+)")
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


def shadow_setting(text):
    """The setting named by a "Shadows: ..." line."""
    text = text.strip()
    return ("original" if text == "original" else "adaptive" if text.endswith("(adaptive)")
            else "base" if text.endswith("(base)") else "unknown")


class Block:
    """One prune run (header, pretrained accuracy, defend time, epsilon) and the attack runs logged after it."""

    def __init__(self, info=None):
        self.info, self.attacks = dict(info or {}), []
        self.in_shadows, self.late_eps = False, None

    def new_attack(self, setting="unknown"):
        self.attacks.append({"setting": setting})
        return self.attacks[-1]

    def rows(self, config):
        info = dict(self.info)
        if "dp_epsilon" not in info and self.late_eps is not None:
            info["dp_epsilon"] = self.late_eps
        for attack in self.attacks or [{"setting": None}]:
            row = {**config, **info, **attack}
            victim_acc = row.pop("victim_acc", math.nan)
            row["pretrained_acc" if row["setting"] == "original" else "pruned_acc"] = victim_acc
            yield row


class LogReader:
    """Folds the lines of one log file into Blocks; one method per kind of line."""

    def __init__(self, defense, find_header):
        self.defense, self.find_header = defense, find_header
        self.blocks, self.attack = [], None

    def block(self):
        """The current block, opened on the first line that needs one (a log without a header line)."""
        if not self.blocks:
            self.blocks.append(Block())
        return self.blocks[-1]

    def feed(self, line):
        for pattern, handle in ((ATTACK_RE, self.on_attack_metric), (RELEASE_ACC_RE, self.on_release_accuracy),
                                (VICTIM_RE, self.on_victim), (SHADOWS_RE, self.on_shadows),
                                (SEMANTICS_RE, self.on_semantics), (PRETRAINED_RE, self.on_pretrained),
                                (DEFEND_TIME_RE, self.on_defend_time), (EPSILON_RE, self.on_epsilon),
                                (SHADOW_ITER_RE, self.on_shadow_iteration), (self.find_header, self.on_header)):
            if m := pattern.search(line):
                handle(m)
                return

    def add_metric(self, name, metric, value):
        column = f"{name}_{METRICS[metric]}"
        if self.attack is None or column in self.attack:  # a repeated metric starts a new run
            self.attack = self.block().new_attack()
        self.attack[column] = value

    def on_attack_metric(self, m):
        self.add_metric(m.group(1), m.group(2), float(m.group(3)))

    def on_release_accuracy(self, m):
        self.add_metric(m.group(1), "accuracy", float(m.group(2)))

    def on_victim(self, m):
        self.attack = self.block().new_attack("original" if m.group(1) == "original" else "unknown")
        self.attack["victim_acc"] = float(m.group(2))

    def on_shadows(self, m):
        self.attack = self.attack or self.block().new_attack()
        self.attack["setting"] = shadow_setting(m.group(1))

    def on_semantics(self, m):
        # It follows the prune header (no attack open: the block's) or the "Shadows:" line (that attack's).
        target = self.block().info if self.attack is None else self.attack
        target["semantics"] = m.group(1)

    def on_pretrained(self, m):
        block = self.blocks[-1] if self.blocks else None
        if block is None or "pretrained_acc" in block.info or block.attacks:
            self.blocks.append(Block())  # a run without a header line
        self.blocks[-1].info["pretrained_acc"] = float(m.group(1))
        self.attack = None

    def on_defend_time(self, m):
        self.block().info["defend_time_s"] = float(m.group(1))

    def on_epsilon(self, m):
        # The victim's epsilon is the last one before the shadows train; later ones are a fallback.
        block = self.block()
        if block.in_shadows:
            block.late_eps = float(m.group(1))
        else:
            block.info["dp_epsilon"] = float(m.group(1))

    def on_shadow_iteration(self, m):
        if self.blocks:
            self.blocks[-1].in_shadows = True

    def on_header(self, m):
        self.blocks.append(Block(parse_header(m, self.defense)))
        self.attack = None


def parse_file(path, dataset, model, seed=DEFAULT_SEED):
    """Rows of one log file, oldest first: one per attack block, or one per prune block without any."""
    pruner, sparsity, defense, tag = FILE_RE.match(os.path.basename(path)[:-4]).groups()
    config = {"dataset": dataset, "model": model, "pruner": pruner, "sparsity": float(sparsity),
              "defense": defense or "base",  # the release writes Base as an empty defend
              "semantics": "release",  # the release's logs have no "Semantics:" lines
              "tag": tag or "", "seed": seed}
    reader = LogReader(config["defense"], header_re(pruner))
    with open(path, errors="replace") as f:
        for line in f:
            reader.feed(line)
    return [row for block in reader.blocks for row in block.rows(config)]


def log_files(log_dir):
    """(path, dataset, model, seed) of every results log, oldest modification first."""
    found = []
    for folder in sorted(os.listdir(log_dir)):
        sub = os.path.join(log_dir, folder)
        if folder == "tb" or not os.path.isdir(sub):
            continue
        dataset, model, seed = FOLDER_RE.match(folder).groups() if FOLDER_RE.match(folder) else (folder, "", None)
        seed = int(seed) if seed else DEFAULT_SEED
        for name in sorted(os.listdir(sub)):
            path = os.path.join(sub, name)
            if not name.endswith(".txt") or name == "pretrain.txt" or not os.path.isfile(path):
                continue
            if not FILE_RE.match(name[:-4]):
                print(f"skipping {path}: name is not <pruner>_<sparsity>_<defend>.txt", file=sys.stderr)
                continue
            found.append((path, dataset, model, seed))
    return sorted(found, key=lambda item: os.path.getmtime(item[0]))  # stable: ties keep name order


def parse_logs(log_dir, newest_only=True):
    """One DataFrame of all results; with newest_only, the last entry per configuration."""
    rows = [row for path, ds, model, seed in log_files(log_dir) for row in parse_file(path, ds, model, seed)]
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(COLUMNS + [k for r in rows for k in r])))
    df = df.astype({c: float for c in df.columns if c not in TEXT_COLUMNS})
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
    """Write the privacy-utility trade-off figure (draw_tradeoff) to path."""
    import matplotlib.pyplot as plt
    fig = draw_tradeoff(df)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_tradeoff(df):
    """Privacy-utility trade-off: pruned test accuracy vs strongest attack, one subplot per dataset_model.
    Returns the matplotlib Figure."""
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
    return fig


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
