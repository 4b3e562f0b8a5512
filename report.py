"""The figures of `summarize.py --plot` and `--report`: the privacy-utility trade-off, log-log ROC curves
from the saved member scores, attack results against sparsity, the paper's bars, accuracy per pruning
iteration and window sensitivity; and report.md, which shows them under the results table.
"""
import math
import os

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from attacks import _rankable
from common import atomic_write
from records import record_time
from results import KEY, TEXT_COLUMNS, value

def plot(df: pd.DataFrame, path: str) -> None:
    """Write the privacy-utility trade-off figure (draw_tradeoff) to path, whole or not at all; its
    extension names the format."""
    fig = draw_tradeoff(df)
    try:
        fmt = os.path.splitext(path)[1][1:].lower()
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        pyplot().close(fig)


def attack_accuracy_columns(df: pd.DataFrame) -> list:
    """<attack>_acc: the attacks' accuracies (not the victim's pretrained_acc or pruned_acc)."""
    return [c for c in df.columns if c.endswith("_acc") and c not in ("pretrained_acc", "pruned_acc")]


def draw_tradeoff(df: pd.DataFrame):
    """Privacy-utility trade-off: pruned test accuracy vs strongest attack, one subplot per dataset_model.
    Returns the matplotlib Figure."""
    plt = pyplot()
    acc_cols = attack_accuracy_columns(df)
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
        several_sparsities = pruned["sparsity"].nunique() > 1
        for defense, d in pruned.groupby("defense", sort=False):
            if defense == "base":
                style = dict(marker="*", s=160, color="black", zorder=3, label="Base")
            else:
                i = defenses.index(defense)
                style = dict(marker=markers[i % len(markers)], color=f"C{i % 10}", s=50, label=defense)
            ax.scatter(d["pruned_acc"], d["attack"], **style)
            for x, y, arg, sparsity, tag in zip(d["pruned_acc"], d["attack"], d["defend_arg"], d["sparsity"], d["tag"]):
                # the defense's argument, and what else tells its points apart: sparsity, tag
                note = [f"{arg:g}"] if not math.isnan(arg) else []
                note += [f"sp {sparsity:g}"] if several_sparsities else []
                note += [tag] if tag else []
                if note:
                    ax.annotate(" ".join(note), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
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


# ---------------------------------------------------------------- report: table and figures

STRONG = ("SAMIA", "Mentr", "LiRA")  # the attacks the ROC and sparsity figures show, as far as present
DIGITS = {"auc": 4}  # decimals in the report's table by column suffix; 3 elsewhere, as in the logs


class NoData(Exception):
    """A figure without the data it needs; the message says why."""


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_label(row):
    """A run's name in legends: defense [argument] [tag] [(corrected)] [, Base shadows]; "unpruned" for
    --original."""
    if row.get("setting") == "original":
        return "unpruned"
    name = "Base" if row["defense"] == "base" else row["defense"]
    arg = row.get("defend_arg")
    if isinstance(arg, float) and not math.isnan(arg):
        name += f" {arg:g}"
    if row.get("tag"):
        name += f" [{row['tag']}]"
    if row.get("semantics") == "corrected":
        name += " (corrected)"
    if row.get("setting") == "base" and row["defense"] != "base":
        name += ", Base shadows"
    return name


def color_of(label, labels):
    """Base black, the unpruned model grey, the others in the default cycle by their place in `labels`."""
    if label.startswith("Base"):
        return "black"
    if label == "unpruned":
        return "grey"
    others = [x for x in labels if not x.startswith("Base") and x != "unpruned"]
    return f"C{others.index(label) % 10}"


def with_labels(df):
    return df.assign(group=df["dataset"] + "_" + df["model"],
                     label=[run_label(row) for row in df.to_dict("records")])


def shown_attacks(df):
    """The STRONG attacks with results in df, else every attack with an accuracy."""
    present = [c[:-len("_acc")] for c in attack_accuracy_columns(df) if df[c].notna().any()]
    return [a for a in STRONG if a in present] or present


def aggregate(df):
    """Rows that differ only in their seed become one: every number as its mean plus <column>_std (the
    sample standard deviation; nan for one seed), and the seeds as "seeds" ("7,8")."""
    keys = [k for k in KEY if k != "seed"]
    numbers = [c for c in df.columns if c not in TEXT_COLUMNS and c not in keys]
    groups = df.groupby(keys, dropna=False, sort=False)
    out = groups[numbers].mean().join(groups[numbers].std().add_suffix("_std"))
    out["seeds"] = groups["seed"].agg(lambda seeds: ",".join(str(s) for s in sorted(seeds)))
    return out.reset_index()


def report_table(agg):
    """Markdown table of aggregate(df): mean ± std where several seeds ran; empty columns left out."""
    names = [k for k in KEY if k != "seed"] + ["seeds"]
    numbers = [c for c in agg.columns if c not in names and not c.endswith("_std")]

    def cell(row, col):
        v = row[col]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if col not in numbers:
            return f"{v:g}" if isinstance(v, float) else str(v)
        digits = DIGITS.get(col.rsplit("_", 1)[-1], 3)
        std = row.get(f"{col}_std", math.nan)
        return f"{v:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

    rows = agg.to_dict("records")
    columns = [c for c in names + numbers if any(cell(r, c) for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_with_error(ax, x, y, err, **style):
    """A line, and error bars only where a standard deviation exists (several seeds)."""
    ax.plot(x, y, **style)
    err = np.asarray(err, dtype=float)
    if np.isfinite(err).any():
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="none", ecolor=style.get("color"), capsize=3, lw=1)


def std_of(df, col):
    return df[f"{col}_std"] if f"{col}_std" in df.columns else np.full(len(df), np.nan)


def shared_legend(fig, *axes):
    """One legend above all panels (they show the same series) for figures with a second y axis, where a
    legend inside a panel would cover one axis' data."""
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))


def panel_grid(n_rows, n_cols, width=4.4, height=3.6):
    fig, axes = pyplot().subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def roc_curves(df, root="."):
    """(curves, problems): for every row of df with a scores file (one seed per setting: the lowest) and
    each STRONG attack in it, the ROC of scikit-learn's roc_curve on the saved member scores, as dicts
    {group, sparsity, attack, label, fpr, tpr, members, nonmembers}."""
    curves, problems, seen = [], [], set()
    rows = df[df["scores"].notna()] if "scores" in df.columns else df.iloc[:0]
    for row in with_labels(rows).sort_values("seed", kind="stable").to_dict("records"):
        line = (row["group"], row["sparsity"], row["label"])
        if line in seen:
            continue
        path = row["scores"] if os.path.isabs(row["scores"]) else os.path.join(root, row["scores"])
        try:
            with np.load(path, allow_pickle=False) as z:
                member = z["member"].astype(bool)
                scores = {a: z[f"score_{a}"] for a in STRONG if f"score_{a}" in z.files}
        except Exception as err:  # missing, truncated, not an npz: say which and go on
            problems.append(f"{path}: scores file unreadable ({type(err).__name__})")
            continue
        seen.add(line)
        for attack, values in scores.items():
            fpr, tpr, _ = roc_curve(member, _rankable(values))
            curves.append({"group": row["group"], "sparsity": row["sparsity"], "attack": attack,
                           "label": row["label"], "fpr": fpr, "tpr": tpr, "members": int(member.sum()),
                           "nonmembers": int((~member).sum())})
    return curves, problems


def draw_roc(curves):
    """Log-log ROC (TPR against FPR, both from 1/n): one panel per dataset_model, sparsity and attack, one
    line per defense, the diagonal dotted."""
    if not curves:
        raise NoData("no run in the table has a scores file (attack runs made before scores were saved)")
    panels = sorted({(c["group"], c["sparsity"]) for c in curves})
    attacks = [a for a in STRONG if any(c["attack"] == a for c in curves)]
    labels = sorted({c["label"] for c in curves})
    fig, axes = panel_grid(len(panels), len(attacks))
    for (group, sparsity), row in zip(panels, axes):
        for attack, ax in zip(attacks, row):
            mine = [c for c in curves if (c["group"], c["sparsity"], c["attack"]) == (group, sparsity, attack)]
            if not mine:
                ax.set_visible(False)
                continue
            low_x, low_y = 1 / max(c["nonmembers"] for c in mine), 1 / max(c["members"] for c in mine)
            for c in mine:
                ax.plot(c["fpr"], c["tpr"], label=c["label"], color=color_of(c["label"], labels), lw=1.3)
            low = min(low_x, low_y)
            ax.plot([low, 1], [low, 1], color="grey", linestyle=":", lw=1, label="chance")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(low_x, 1)
            ax.set_ylim(low_y, 1)
            ax.set_title(f"{group}, sparsity {sparsity:g}: {attack}")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_sparsity(agg):
    """Attack accuracy and AUC against sparsity, one line per defense (error bars: std over seeds)."""
    df = with_labels(agg[agg["setting"].notna() & (agg["setting"] != "original")])
    groups = [g for g in dict.fromkeys(df["group"]) if df[df["group"] == g]["sparsity"].nunique() >= 2]
    if not groups:
        raise NoData("the runs hold one sparsity per dataset and model")
    attacks = shown_attacks(df)
    columns = [(a, m) for a in attacks for m in ("acc", "auc") if f"{a}_{m}" in df.columns]
    if not columns:
        raise NoData("no attack results")
    fig, axes = panel_grid(len(groups), len(columns))
    for group, row in zip(groups, axes):
        g = df[df["group"] == group]
        labels = sorted(set(g["label"]))
        for (attack, metric), ax in zip(columns, row):
            col = f"{attack}_{metric}"
            for label in dict.fromkeys(g["label"]):
                d = g[(g["label"] == label) & g[col].notna()].sort_values("sparsity")
                if len(d):
                    plot_with_error(ax, d["sparsity"], d[col], std_of(d, col), marker="o", label=label,
                                    color=color_of(label, labels))
            ax.set_xticks(sorted(set(g["sparsity"])))
            ax.set_title(f"{group}: {attack} {'accuracy' if metric == 'acc' else 'AUC'}")
            ax.set_xlabel("sparsity")
            ax.set_ylabel("attack accuracy (%)" if metric == "acc" else "attack AUC")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_bars(agg):
    """The paper's style: pruned test accuracy as bars per defense (left axis), SAMIA and Conf attack
    accuracy as lines over them (right axis); one panel per dataset_model and sparsity."""
    df = with_labels(agg[agg["setting"].notna() & (agg["setting"] != "original") & agg["pruned_acc"].notna()])
    attacks = [a for a in ("SAMIA", "Conf") if f"{a}_acc" in df.columns and df[f"{a}_acc"].notna().any()]
    if df.empty or not attacks:
        raise NoData("no pruned run with SAMIA or Conf results")
    panels = list(dict.fromkeys(zip(df["group"], df["sparsity"])))
    fig, axes = panel_grid(1, len(panels), width=max(4.4, 0.9 * df["label"].nunique() + 2))
    for (group, sparsity), ax in zip(panels, axes[0]):
        d = df[(df["group"] == group) & (df["sparsity"] == sparsity)]
        x = np.arange(len(d))
        err = np.nan_to_num(np.asarray(std_of(d, "pruned_acc"), dtype=float))
        ax.bar(x, d["pruned_acc"], yerr=err if err.any() else None, color="lightsteelblue", edgecolor="black",
               capsize=3, label="pruned test accuracy")
        ax.set_ylim(max(0, d["pruned_acc"].min() - 15), 100)
        ax.set_xticks(x, d["label"], rotation=30, ha="right")
        ax.set_ylabel("pruned victim test accuracy (%)")
        ax.set_title(f"{group}, sparsity {sparsity:g}")
        twin = ax.twinx()
        for attack, style in zip(attacks, (dict(marker="o", color="C3"), dict(marker="s", color="C2", ls="--"))):
            plot_with_error(twin, x, d[f"{attack}_acc"], std_of(d, f"{attack}_acc"), label=f"{attack} attack", **style)
        twin.set_ylabel("attack accuracy (%)")
    shared_legend(fig, ax, twin)
    return fig


def iteration_table(records):
    """One row per (prune record, iteration): the victim's best dev accuracy of that iteration; newest record
    per setting and seed."""
    rows = []
    for record in sorted((r for r in records if r["kind"] == "prune"), key=record_time):
        fields = {**record["fields"], "setting": None}
        for i, it in enumerate(record["results"].get("iterations", {}).get("victim", [])):
            rows.append({**fields, "iteration": i, "dev_acc": value(it.get("accuracy")), "run": record["run_id"]})
    if not rows:
        return pd.DataFrame(columns=["group", "sparsity", "label", "seed", "iteration", "dev_acc"])
    df = with_labels(pd.DataFrame(rows))
    newest = df.drop_duplicates(["group", "sparsity", "label", "seed"], keep="last")["run"]
    return df[df["run"].isin(set(newest))]


def draw_iterations(records):
    """The victim's best dev accuracy per pruning iteration, one line per defense (mean ± std over seeds)."""
    df = iteration_table(records)
    if df.empty:
        raise NoData("no prune records (prune runs made before records were written)")
    panels = sorted(set(zip(df["group"], df["sparsity"])))
    fig, axes = panel_grid(1, len(panels))
    for (group, sparsity), ax in zip(panels, axes[0]):
        d = df[(df["group"] == group) & (df["sparsity"] == sparsity)]
        labels = sorted(set(d["label"]))
        for label in dict.fromkeys(d["label"]):
            per = d[d["label"] == label].groupby("iteration")["dev_acc"]
            mean, std = per.mean(), per.std()
            plot_with_error(ax, mean.index, mean.values, std.values, marker="o", label=label,
                            color=color_of(label, labels))
        ax.set_xticks(sorted(set(d["iteration"])))
        ax.set_title(f"{group}, sparsity {sparsity:g}")
        ax.set_xlabel("pruning iteration")
        ax.set_ylabel("victim best dev accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_sensitivity(agg):
    """Per window defense with several window settings (tags): pruned test accuracy (left axis) and attack
    accuracy (right axis) per stride-width."""
    df = agg[agg["setting"].notna() & (agg["setting"] != "original") & agg["window"].notna()]
    df = df.assign(group=df["dataset"] + "_" + df["model"])
    cases = [(case, d) for case, d in df.groupby(["group", "sparsity", "defense", "setting", "semantics"], sort=False)
             if len(d.drop_duplicates(["window", "tag"])) >= 2]
    if not cases:
        raise NoData("the runs hold one window setting per defense")
    attacks = shown_attacks(df)
    fig, axes = panel_grid(1, len(cases))
    for ((group, sparsity, defense, setting, semantics), d), ax in zip(cases, axes[0]):
        d = d.assign(order=[tuple(int(v) for v in w.split("-")) for w in d["window"]]).sort_values(["order", "tag"])
        x = np.arange(len(d))
        ticks = [w if not tag else f"{w}\n[{tag}]" for w, tag in zip(d["window"], d["tag"])]
        plot_with_error(ax, x, d["pruned_acc"], std_of(d, "pruned_acc"), marker="s", color="black",
                        label="pruned test accuracy")
        ax.set_xticks(x, ticks)
        ax.set_xlabel("stride-width")
        ax.set_ylabel("pruned victim test accuracy (%)")
        name = run_label({"defense": defense, "setting": setting, "semantics": semantics})
        ax.set_title(f"{group}, sparsity {sparsity:g}: {name}")
        twin = ax.twinx()
        for i, attack in enumerate(attacks):
            plot_with_error(twin, x, d[f"{attack}_acc"], std_of(d, f"{attack}_acc"), marker="o", color=f"C{i}",
                            label=f"{attack} attack")
        twin.set_ylabel("attack accuracy (%)")
    shared_legend(fig, ax, twin)
    return fig


def draw_tradeoff_or_why(agg):
    acc_cols = attack_accuracy_columns(agg)
    attacked = agg[agg["pruned_acc"].notna() & agg[acc_cols].notna().any(axis=1)] if acc_cols else agg.iloc[:0]
    if attacked.empty:
        raise NoData("no pruned run has been attacked")
    return draw_tradeoff(agg)


FIGURES = [  # (file name, caption, draw(collected, newest table aggregated over seeds, root))
    ("roc", "ROC on log-log axes (TPR against FPR, from 1/n), per dataset-model, sparsity and attack (SAMIA, "
            "Mentr, LiRA as present), one line per defense (one seed), from the saved member scores with "
            "scikit-learn's roc_curve; dotted: chance.",
     lambda c, agg, root: draw_roc(roc_curves(c.table, root)[0])),
    ("sparsity", "Attack accuracy and AUC against sparsity, one line per defense (error bars: std over seeds).",
     lambda c, agg, root: draw_sparsity(agg)),
    ("bars", "Pruned victim test accuracy (bars, left axis) with SAMIA and Conf attack accuracy (lines, right "
             "axis) per defense, in the paper's style.",
     lambda c, agg, root: draw_bars(agg)),
    ("iterations", "The victim's best dev accuracy in each pruning iteration, one line per defense (prune records).",
     lambda c, agg, root: draw_iterations(c.records)),
    ("sensitivity", "Window sensitivity: pruned test accuracy (left axis) and attack accuracy (right axis) per "
                    "stride-width setting of a window defense.",
     lambda c, agg, root: draw_sensitivity(agg)),
    ("tradeoff", "Privacy-utility trade-off: pruned test accuracy against the strongest attack's accuracy "
                 "(mean over seeds); Base as the black star, the unpruned model as the dashed line.",
     lambda c, agg, root: draw_tradeoff_or_why(agg)),
]


def save_figure(fig, path):
    for ext in ("png", "pdf"):
        atomic_write(f"{path}.{ext}", lambda f: fig.savefig(f, format=ext, dpi=120))
    pyplot().close(fig)


def write_report(out_dir: str, collected, root: str, sources: str = "") -> list:
    """OUT_DIR/results.csv, the figures (PNG and PDF) and report.md: the table, then each figure with its
    caption, or one line saying why it is left out. Returns the lines that say what was left out."""
    df = collected.table
    atomic_write(os.path.join(out_dir, "results.csv"), lambda f: f.write(df.to_csv(index=False).encode()))
    agg = aggregate(df)
    problems = list(collected.problems)
    lines = ["# Results", "", f"{len(df)} runs{sources}: the newest result of each attack per setting, one row per "
             "setting with mean ± standard deviation over seeds where several seeds ran it (column seeds). Every "
             "run, per seed: [results.csv](results.csv).", "", report_table(agg), "", "## Figures", ""]
    left_out = []
    for name, caption, draw in FIGURES:
        try:
            fig = draw(collected, agg, root)
        except NoData as why:
            left_out.append(f"no {name} figure: {why}")
            lines += [f"_{left_out[-1]}_", ""]
            continue
        save_figure(fig, os.path.join(out_dir, name))
        lines += [f"![{name}]({name}.png)", "", f"{caption} ([PDF]({name}.pdf))", ""]
    problems += roc_curves(df, root)[1]
    if problems:
        lines += ["## Skipped", ""] + [f"- skipped {p}" for p in problems]
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write(os.path.join(out_dir, "report.md"), lambda f: f.write(text.encode()))
    return left_out + [f"skipped {p}" for p in problems]
