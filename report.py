"""The figures of `summarize.py --plot` and `--report`: the privacy-utility trade-off, log-log ROC curves
from the saved member scores, attack results against sparsity, the paper's bars, accuracy per pruning
iteration and window sensitivity; and report.md, which shows them under the results table.
"""

import math
import os

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

import paths
from attacks import _rankable
from common import atomic_write
from intervals import FPR_TARGETS, RESAMPLES, align, measurable, paired_difference, read_attacked
from records import record_time
from results import KEY, METRICS, TEXT_COLUMNS, value

CHANCE = 50.0  # attack accuracy (%) of a coin flip: where attack-accuracy axes start unless zoomed


def plot(df: pd.DataFrame, path: str, zoom: bool = False) -> None:
    """Write the privacy-utility trade-off figure (draw_tradeoff) to path, whole or not at all; its
    extension names the format."""
    fig = draw_tradeoff(df, zoom)
    try:
        fmt = os.path.splitext(path)[1][1:].lower()
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        pyplot().close(fig)


def attack_accuracy_columns(df: pd.DataFrame) -> list:
    """<attack>_acc: the attacks' accuracies (not the victim's pretrained_acc or pruned_acc)."""
    return [c for c in df.columns if c.endswith("_acc") and c not in ("pretrained_acc", "pruned_acc")]


def axis_label(ax, which: str, text: str, natural_low: float) -> None:
    """Label the x or y axis; an axis whose range starts above its natural start (chance for attack
    accuracy, 0 for test accuracy) says so: "<text>, axis zoomed"."""
    low = (ax.get_xlim() if which == "x" else ax.get_ylim())[0]
    zoomed = low > natural_low + 1e-9
    (ax.set_xlabel if which == "x" else ax.set_ylabel)(text + (", axis zoomed" if zoomed else ""))


def attack_axis(ax, text: str = "attack accuracy (%)", zoom: bool = False, which: str = "y") -> None:
    """An attack-accuracy axis: from chance (50 %, lower if a value lies below) unless zoom, then labelled."""
    if not zoom:
        low, high = ax.get_xlim() if which == "x" else ax.get_ylim()
        data_low = ax.dataLim.x0 if which == "x" else ax.dataLim.y0
        low = CHANCE if data_low >= CHANCE else low  # below chance: the autoscale's
        limits = (low, max(high + 0.03 * (high - low), CHANCE + 1))  # headroom for markers at the top
        (ax.set_xlim if which == "x" else ax.set_ylim)(*limits)
    axis_label(ax, which, text, CHANCE)


def draw_tradeoff(df: pd.DataFrame, zoom: bool = False):
    """Privacy-utility trade-off: pruned test accuracy vs strongest attack, one subplot per dataset_model,
    the unpruned model as the reference. The attack axis starts at chance unless zoom. Returns the Figure."""
    plt = pyplot()
    acc_cols = attack_accuracy_columns(df)
    df = df.assign(attack=df[acc_cols].max(axis=1) if acc_cols else math.nan, group=df["dataset"] + "_" + df["model"])
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
            ax.scatter(
                original["pretrained_acc"],
                original["attack"],
                marker="X",
                s=90,
                color="grey",
                label="unpruned, attacked",
            )
        ax.set_title(group)
        axis_label(ax, "x", "pruned victim test accuracy (%)", 0)
        attack_axis(ax, "strongest attack accuracy (%)", zoom)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes.flat[len(groups) :]:
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
    return df.assign(group=df["dataset"] + "_" + df["model"], label=[run_label(row) for row in df.to_dict("records")])


def shown_attacks(df):
    """The STRONG attacks with results in df, else every attack with an accuracy."""
    present = [c[: -len("_acc")] for c in attack_accuracy_columns(df) if df[c].notna().any()]
    return [a for a in STRONG if a in present] or present


def aggregate(df):
    """Rows that differ only in their seed become one: every number as its mean plus <column>_std (the
    sample standard deviation; nan for one seed) and the seeds' spread <column>_min, <column>_max, and the
    seeds as "seeds" ("7,8")."""
    keys = [k for k in KEY if k != "seed"]
    numbers = [c for c in df.columns if c not in TEXT_COLUMNS and c not in keys]
    groups = df.groupby(keys, dropna=False, sort=False)
    seeds = groups["seed"].agg(lambda seeds: ",".join(str(s) for s in sorted(seeds))).rename("seeds")
    out = pd.concat(
        [
            groups[numbers].mean(),
            groups[numbers].std().add_suffix("_std"),
            groups[numbers].min().add_suffix("_min"),
            groups[numbers].max().add_suffix("_max"),
            seeds,
        ],
        axis=1,
    )
    return out.copy().reset_index()  # copy: one block, not one per column, before the key columns go in


DERIVED = ("_std", "_min", "_max", "_lo", "_hi")  # columns shown inside another column's cell
TPR_COLUMNS = {short: metric for metric, short in METRICS.items() if metric in FPR_TARGETS}  # tpr1, tpr01
NOT_MEASURABLE = "n/m"
TABLE_NOTE = (
    f"Cells: value [95 % bootstrap interval over the attacked samples] for one seed; mean ± std "
    f"(min–max) over seeds where several ran. {NOT_MEASURABLE}: TPR at an FPR below 10 / "
    f"(non-members) rests on fewer than ten false positives, not measurable with this many non-members."
)


def not_measurable(row, col) -> bool:
    """A TPR@FPR column of a run with too few non-members for that FPR (intervals.measurable)."""
    short = col.rsplit("_", 1)[-1]
    nonmembers = float(row.get("nonmembers", math.nan))
    return short in TPR_COLUMNS and not math.isnan(nonmembers) and not measurable(TPR_COLUMNS[short], int(nonmembers))


def report_table(agg):
    """Markdown table of aggregate(df): a value with its bootstrap interval for one seed, mean ± std (min–max)
    where several seeds ran; TPRs that cannot be measured marked; empty columns left out."""
    names = [k for k in KEY if k != "seed"] + ["seeds"]
    numbers = [c for c in agg.columns if c not in names and not c.endswith(DERIVED)]
    nan = lambda v: v is None or (isinstance(v, float) and math.isnan(v))

    def cell(row, col):
        v = row[col]
        if nan(v):
            return ""
        if col not in numbers:
            return f"{v:g}" if isinstance(v, float) else str(v)
        if col == "nonmembers":
            return f"{v:.0f}"
        if not_measurable(row, col):
            return NOT_MEASURABLE
        digits = DIGITS.get(col.rsplit("_", 1)[-1], 3)
        std = row.get(f"{col}_std", math.nan)
        if not nan(std):
            return f"{v:.{digits}f} ± {std:.{digits}f} ({row[f'{col}_min']:.{digits}f}–{row[f'{col}_max']:.{digits}f})"
        low, high = row.get(f"{col}_lo", math.nan), row.get(f"{col}_hi", math.nan)
        return f"{v:.{digits}f}" + ("" if nan(low) or nan(high) else f" [{low:.{digits}f}, {high:.{digits}f}]")

    rows = agg.to_dict("records")
    columns = [c for c in names + numbers if any(cell(r, c) for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_with_error(ax, x, y, err, **style):
    """A line, and error bars only where an error exists: err is (n,) symmetric or (2, n) below/above."""
    ax.plot(x, y, **style)
    err = np.asarray(err, dtype=float)
    if np.isfinite(err).any():
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="none", ecolor=style.get("color"), capsize=3, lw=1)


def error_of(df, col):
    """(2, n) error bars of a column: the std over seeds where several seeds ran, else the 95 % bootstrap
    interval of the run (results.csv's <col>_lo/_hi), else none (nan)."""
    values = np.asarray(df[col], dtype=float)
    std = np.asarray(std_of(df, col), dtype=float)
    low = np.asarray(df[f"{col}_lo"], dtype=float) if f"{col}_lo" in df.columns else np.full(len(df), np.nan)
    high = np.asarray(df[f"{col}_hi"], dtype=float) if f"{col}_hi" in df.columns else np.full(len(df), np.nan)
    several = np.isfinite(std)  # (a percentile interval may, rarely, not hold its value: no negative bar)
    return np.stack(
        [np.where(several, std, np.maximum(values - low, 0)), np.where(several, std, np.maximum(high - values, 0))]
    )


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
            curves.append(
                {
                    "group": row["group"],
                    "sparsity": row["sparsity"],
                    "attack": attack,
                    "label": row["label"],
                    "fpr": fpr,
                    "tpr": tpr,
                    "members": int(member.sum()),
                    "nonmembers": int((~member).sum()),
                }
            )
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


def unpruned_rows(agg, group):
    """The unpruned model's attacked rows (--original) of a dataset_model."""
    df = agg[agg["setting"] == "original"]
    return df[df["dataset"] + "_" + df["model"] == group]


def unpruned_reference(agg, group, col):
    """The unpruned model's value of `col` in a dataset_model (the newest --original row), or nan."""
    values = unpruned_rows(agg, group)[col].dropna() if col in agg.columns else pd.Series(dtype=float)
    if col == "pretrained_acc" and not len(values):  # the prune runs log it too
        g = agg[agg["dataset"] + "_" + agg["model"] == group]
        values = g["pretrained_acc"].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def draw_sparsity(agg, zoom=False):
    """Attack accuracy and AUC against sparsity, one line per defense (error bars: std over seeds, or the
    95 % bootstrap interval of one seed), the unpruned model as a dashed line."""
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
                    plot_with_error(
                        ax,
                        d["sparsity"],
                        d[col],
                        error_of(d, col),
                        marker="o",
                        label=label,
                        color=color_of(label, labels),
                    )
            reference = unpruned_reference(agg, group, col)
            if not math.isnan(reference):
                ax.axhline(reference, color="grey", linestyle="--", lw=1, label="unpruned")
            ax.set_xticks(sorted(set(g["sparsity"])))
            ax.set_title(f"{group}: {attack} {'accuracy' if metric == 'acc' else 'AUC'}")
            ax.set_xlabel("sparsity")
            if metric == "acc":
                attack_axis(ax, zoom=zoom)
            else:
                ax.set_ylabel("attack AUC")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_bars(agg, zoom=False):
    """The paper's style: pruned test accuracy as bars per defense (left axis), SAMIA and Conf attack
    accuracy as lines over them (right axis, from chance unless zoom); the unpruned model as the first bar
    (its attack accuracy where it was attacked); one panel per dataset_model and sparsity."""
    df = with_labels(agg[agg["setting"].notna() & (agg["setting"] != "original") & agg["pruned_acc"].notna()])
    attacks = [a for a in ("SAMIA", "Conf") if f"{a}_acc" in df.columns and df[f"{a}_acc"].notna().any()]
    if df.empty or not attacks:
        raise NoData("no pruned run with SAMIA or Conf results")
    panels = list(dict.fromkeys(zip(df["group"], df["sparsity"])))
    fig, axes = panel_grid(1, len(panels), width=max(4.4, 0.9 * (df["label"].nunique() + 1) + 2))
    for (group, sparsity), ax in zip(panels, axes[0]):
        d = df[(df["group"] == group) & (df["sparsity"] == sparsity)]
        unpruned = {"label": "unpruned", "pruned_acc": unpruned_reference(agg, group, "pretrained_acc")}
        for attack in attacks:
            unpruned[f"{attack}_acc"] = unpruned_reference(agg, group, f"{attack}_acc")
            for bound in ("lo", "hi"):
                unpruned[f"{attack}_acc_{bound}"] = unpruned_reference(agg, group, f"{attack}_acc_{bound}")
        if not math.isnan(unpruned["pruned_acc"]):
            d = pd.concat([pd.DataFrame([unpruned]), d], ignore_index=True)
        x = np.arange(len(d))
        err = np.nan_to_num(np.asarray(std_of(d, "pruned_acc"), dtype=float))
        colors = ["gainsboro" if label == "unpruned" else "lightsteelblue" for label in d["label"]]
        ax.bar(
            x,
            d["pruned_acc"],
            yerr=err if err.any() else None,
            color=colors,
            edgecolor="black",
            capsize=3,
            label="test accuracy",
        )
        ax.set_ylim(max(0, d["pruned_acc"].min() - 15), 100)
        ax.set_xticks(x, d["label"], rotation=30, ha="right")
        axis_label(ax, "y", "victim test accuracy (%)", 0)
        ax.set_title(f"{group}, sparsity {sparsity:g}")
        twin = ax.twinx()
        for attack, style in zip(attacks, (dict(marker="o", color="C3"), dict(marker="s", color="C2", ls="--"))):
            plot_with_error(
                twin, x, d[f"{attack}_acc"], error_of(d, f"{attack}_acc"), label=f"{attack} attack", **style
            )
        attack_axis(twin, zoom=zoom)
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
            plot_with_error(
                ax, mean.index, mean.values, std.values, marker="o", label=label, color=color_of(label, labels)
            )
        ax.set_xticks(sorted(set(d["iteration"])))
        ax.set_title(f"{group}, sparsity {sparsity:g}")
        ax.set_xlabel("pruning iteration")
        ax.set_ylabel("victim best dev accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_sensitivity(agg, zoom=False):
    """Per window defense with several window settings (tags): pruned test accuracy (left axis, the unpruned
    model's as a dashed line) and attack accuracy (right axis, from chance unless zoom) per stride-width."""
    df = agg[agg["setting"].notna() & (agg["setting"] != "original") & agg["window"].notna()]
    df = df.assign(group=df["dataset"] + "_" + df["model"])
    cases = [
        (case, d)
        for case, d in df.groupby(["group", "sparsity", "defense", "setting", "semantics"], sort=False)
        if len(d.drop_duplicates(["window", "tag"])) >= 2
    ]
    if not cases:
        raise NoData("the runs hold one window setting per defense")
    attacks = shown_attacks(df)
    fig, axes = panel_grid(1, len(cases))
    for ((group, sparsity, defense, setting, semantics), d), ax in zip(cases, axes[0]):
        d = d.assign(order=[tuple(int(v) for v in w.split("-")) for w in d["window"]]).sort_values(["order", "tag"])
        x = np.arange(len(d))
        ticks = [w if not tag else f"{w}\n[{tag}]" for w, tag in zip(d["window"], d["tag"])]
        plot_with_error(
            ax, x, d["pruned_acc"], std_of(d, "pruned_acc"), marker="s", color="black", label="pruned test accuracy"
        )
        ax.set_xticks(x, ticks)
        ax.set_xlabel("stride-width")
        reference = unpruned_reference(agg, group, "pretrained_acc")
        if not math.isnan(reference):
            ax.axhline(reference, color="grey", linestyle="--", lw=1, label="unpruned test accuracy")
        axis_label(ax, "y", "pruned victim test accuracy (%)", 0)
        name = run_label({"defense": defense, "setting": setting, "semantics": semantics})
        ax.set_title(f"{group}, sparsity {sparsity:g}: {name}")
        twin = ax.twinx()
        for i, attack in enumerate(attacks):
            plot_with_error(
                twin,
                x,
                d[f"{attack}_acc"],
                error_of(d, f"{attack}_acc"),
                marker="o",
                color=f"C{i}",
                label=f"{attack} attack",
            )
        attack_axis(twin, zoom=zoom)
    shared_legend(fig, ax, twin)
    return fig


def draw_tradeoff_or_why(agg, zoom=False):
    acc_cols = attack_accuracy_columns(agg)
    attacked = agg[agg["pruned_acc"].notna() & agg[acc_cols].notna().any(axis=1)] if acc_cols else agg.iloc[:0]
    if attacked.empty:
        raise NoData("no pruned run has been attacked")
    return draw_tradeoff(agg, zoom)


# ---------------------------------------------------------------- a defense against Base, paired

PAIRED_METRICS = ("accuracy", "AUC") + tuple(FPR_TARGETS)


def scores_path(path, root):
    return path if os.path.isabs(path) else os.path.join(root, path)


def base_of(df, row):
    """The Base row that a defense's row is compared with: same dataset, model, pruner, sparsity, seed and
    semantics, Base-pruned shadows, untagged; None if there is none with a scores file."""
    same = (df["defense"] == "base") & (df["setting"] == "base") & (df["tag"].fillna("") == "") & df["scores"].notna()
    for key in ("dataset", "model", "pruner", "sparsity", "seed", "semantics"):
        same &= df[key] == row[key]
    return df[same].iloc[-1] if same.any() else None


def paired_table(df, root=".", resamples=RESAMPLES):
    """(DataFrame, problems): per defense row with a scores file and a Base row to pair with (base_of), per
    attack in both and metric, <attack>_<metric>_diff (defense - Base), _diff_lo, _diff_hi: the 95 %
    interval of the difference over the same resamples of the same samples (seed: the run's)."""
    if "scores" not in df.columns:
        return pd.DataFrame(columns=KEY), []
    rows, problems, loaded = [], [], {}

    def load(path):
        if path not in loaded:
            loaded[path] = read_attacked(scores_path(path, root), _rankable)
        return loaded[path]

    for row in df[(df["defense"] != "base") & (df["setting"] != "original") & df["scores"].notna()].to_dict("records"):
        base = base_of(df, row)
        if base is None:
            continue
        try:
            (index, runs), (base_index, base_runs) = load(row["scores"]), load(base["scores"])
        except Exception:  # missing, truncated: named once in the report's Skipped list (roc_curves)
            continue
        out = {k: row[k] for k in KEY}
        for attack in [a for a in runs if a in base_runs]:
            pair = align(index, runs[attack], base_index, base_runs[attack])
            if pair is None:
                problems.append(f"{row['scores']}: other samples than Base's {base['scores']}; not paired")
                break
            found = paired_difference(*pair, resamples=resamples, seed=int(row["seed"]))
            out["nonmembers"] = int((~pair[0].member).sum())
            for metric in PAIRED_METRICS:
                diff, low, high = found[metric]
                col = f"{attack}_{METRICS[metric]}_diff"
                out.update({col: diff, f"{col}_lo": low, f"{col}_hi": high})
        rows.append(out)
    return pd.DataFrame(rows, columns=list(dict.fromkeys(KEY + [k for r in rows for k in r]))), problems


def paired_cell(row, col):
    """ "+1.234 [0.5, 2.0] changed": the difference, its interval, and whether 0 is outside it."""
    diff, low, high = row.get(col, math.nan), row.get(f"{col}_lo", math.nan), row.get(f"{col}_hi", math.nan)
    if isinstance(diff, float) and math.isnan(diff):
        return ""
    if not_measurable(row, col[: -len("_diff")]):
        return NOT_MEASURABLE
    digits = DIGITS.get(col[: -len("_diff")].rsplit("_", 1)[-1], 3)
    changed = low > 0 or high < 0
    return f"{diff:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]" + (" changed" if changed else "")


def paired_markdown(paired):
    """The paired table: one row per defense run and seed, per attack its accuracy and AUC difference."""
    labels = [run_label(r) for r in paired.to_dict("records")]
    cols = [c for c in paired.columns if c.endswith("_diff") and not c.endswith(("_tpr1_diff", "_tpr01_diff"))]
    cols += [c for c in paired.columns if c.endswith(("_tpr1_diff", "_tpr01_diff"))]
    lines = [
        "| run | sparsity | seed | " + " | ".join(f"Δ {c[: -len('_diff')]}" for c in cols) + " |",
        "|" + "---|" * (3 + len(cols)),
    ]
    for label, row in zip(labels, paired.to_dict("records")):
        lines.append(
            f"| {label} | {row['sparsity']:g} | {row['seed']} | " + " | ".join(paired_cell(row, c) for c in cols) + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the paper's mechanism, per sample

MECHANISM_ATTACKS = ("RMIA", "LiRA")  # the per-sample member score the bins show: the first one present
BINS = 10
MECHANISM_CAPTION = (
    "The victim's members binned by mem-score deciles (1 = lowest; decile k holds the scores above "
    "the (k-1)-th and up to the k-th decile edge, so tied scores share a bin and a decile without "
    "members is left out), per bin the mean member score of the attack named in the title on the "
    "unpruned model, the pruned Base model and under each defense (one seed: the lowest)."
)


def read_memscores_csv(dataset, model):
    """The config's mem-scores (row i = training-set index i), or None without a file."""
    path = paths.memscore_path(dataset, model)
    if not os.path.isfile(path):
        return None
    return pd.read_csv(path, index_col=0)["0"].to_numpy(np.float64)


def mechanism_runs(df, group, seed):
    """(label, row) of the runs of one dataset_model and seed that a mem-score panel shows, per sparsity:
    {sparsity: [unpruned, Base, defenses ...]} (the unpruned model in every sparsity's panel)."""
    rows = with_labels(df[df["scores"].notna() & (df["seed"] == seed)])
    rows = rows[rows["group"] == group]
    unpruned = rows[rows["setting"] == "original"].tail(1).to_dict("records")
    pruned = rows[rows["setting"] != "original"]
    out = {}
    for sparsity, d in pruned.groupby("sparsity", sort=True):
        d = d.assign(is_base=d["defense"] != "base").sort_values("is_base", kind="stable")
        out[sparsity] = [(r["label"], r) for r in unpruned + d.to_dict("records")]
    return out


def mechanism_table(df, root="."):
    """Panels (one per dataset_model with mem-scores and sparsity, lowest seed): dicts {group, sparsity, seed,
    attack, labels, bins}, bins a list of {bin, low, high, count, means: {label: mean member score}}."""
    if "scores" not in df.columns or not df["scores"].notna().any():
        raise NoData("no run in the table has a scores file")
    panels, why = [], []
    with_groups = df[df["scores"].notna()].assign(group=df["dataset"] + "_" + df["model"])
    for group, g in with_groups.groupby("group", sort=True):
        dataset, model = g["dataset"].iloc[0], g["model"].iloc[0]
        memscores = read_memscores_csv(dataset, model)
        if memscores is None:
            why.append(f"{group} has no mem-scores ({paths.memscore_path(dataset, model)})")
            continue
        seed = int(g["seed"].min())
        for sparsity, runs in mechanism_runs(df, group, seed).items():
            panel = mechanism_panel(runs, memscores, root)
            if panel is None:
                why.append(f"{group}, sparsity {sparsity:g}: no {' or '.join(MECHANISM_ATTACKS)} scores of Base")
                continue
            panels.append({"group": group, "sparsity": sparsity, "seed": seed, **panel})
    if not panels:
        raise NoData("; ".join(why) or "no run with mem-scores")
    return panels


def mechanism_panel(runs, memscores, root):
    """The bins of one panel, or None when the Base run has no member score of MECHANISM_ATTACKS."""
    data = {}
    for label, row in runs:
        with np.load(scores_path(row["scores"], root), allow_pickle=False) as z:
            keep = z["member"].astype(bool) & (z["set"] == "train")
            data[label] = {
                "index": z["set_index"][keep].astype(np.int64),
                **{a: z[f"score_{a}"][keep] for a in MECHANISM_ATTACKS if f"score_{a}" in z.files},
            }
    base = next((label for label, row in runs if row["defense"] == "base" and row["setting"] != "original"), None)
    attack = next((a for a in MECHANISM_ATTACKS if base is not None and a in data[base]), None)
    if attack is None:
        return None
    index = data[base]["index"]
    if index.max(initial=-1) >= len(memscores):
        return None
    labels = [
        label
        for label, _ in runs
        if attack in data[label] and np.array_equal(np.sort(data[label]["index"]), np.sort(index))
    ]
    score_of = {}
    for label in labels:  # every run's scores in Base's sample order
        where = np.argsort(data[label]["index"])[np.searchsorted(np.sort(data[label]["index"]), index)]
        score_of[label] = data[label][attack][where]
    mem = memscores[index]
    edges = np.quantile(mem, np.arange(1, BINS) / BINS)
    which = np.searchsorted(edges, mem, side="left")  # decile k holds (edge k-1, edge k]: ties share one
    bins = []
    for k in range(BINS):
        part = np.flatnonzero(which == k)
        if len(part):
            bins.append(
                {
                    "bin": k + 1,
                    "low": float(mem[part].min()),
                    "high": float(mem[part].max()),
                    "count": len(part),
                    "means": {label: float(score_of[label][part].mean()) for label in labels},
                }
            )
    return {"attack": attack, "labels": labels, "bins": bins}


def mechanism_markdown(panels):
    lines = []
    for p in panels:
        lines += [
            f"{p['group']}, sparsity {p['sparsity']:g}, seed {p['seed']}: mean {p['attack']} member score "
            f"of the victim's members per mem-score decile",
            "",
            "| decile | mem-score | members | " + " | ".join(p["labels"]) + " |",
            "|" + "---|" * (3 + len(p["labels"])),
        ]
        lines += [
            f"| {b['bin']} | {b['low']:.3f}–{b['high']:.3f} | {b['count']} | "
            + " | ".join(f"{b['means'][label]:.3f}" for label in p["labels"])
            + " |"
            for b in p["bins"]
        ]
        lines.append("")
    return "\n".join(lines).rstrip()


def draw_mechanism(panels):
    """Mean member score per mem-score decile, one line per run (unpruned, Base, defenses)."""
    fig, axes = panel_grid(1, len(panels))
    for p, ax in zip(panels, axes[0]):
        for label in p["labels"]:
            ax.plot(
                [b["bin"] for b in p["bins"]],
                [b["means"][label] for b in p["bins"]],
                marker="o",
                label=label,
                color=color_of(label, p["labels"]),
            )
        ax.set_xticks([b["bin"] for b in p["bins"]])
        ax.set_title(f"{p['group']}, sparsity {p['sparsity']:g}: {p['attack']}")
        ax.set_xlabel("mem-score decile (1 = lowest)")
        ax.set_xlim(0.5, BINS + 0.5)
        ax.set_ylabel(f"mean {p['attack']} member score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES = [  # (file name, caption, draw(collected, newest table aggregated over seeds, root, zoom))
    (
        "roc",
        "ROC on log-log axes (TPR against FPR, from 1/n), per dataset-model, sparsity and attack (SAMIA, "
        "Mentr, LiRA as present), one line per defense (one seed), from the saved member scores with "
        "scikit-learn's roc_curve; dotted: chance.",
        lambda c, agg, root, zoom: draw_roc(roc_curves(c.table, root)[0]),
    ),
    (
        "sparsity",
        "Attack accuracy and AUC against sparsity, one line per defense (error bars: std over seeds, "
        "or the 95 % bootstrap interval for one seed); dashed: the unpruned model.",
        lambda c, agg, root, zoom: draw_sparsity(agg, zoom),
    ),
    (
        "bars",
        "Victim test accuracy (bars, left axis) with SAMIA and Conf attack accuracy (lines, right axis, "
        "error bars as above) per defense, in the paper's style; the first bar is the unpruned model.",
        lambda c, agg, root, zoom: draw_bars(agg, zoom),
    ),
    (
        "iterations",
        "The victim's best dev accuracy in each pruning iteration, one line per defense (prune records).",
        lambda c, agg, root, zoom: draw_iterations(c.records),
    ),
    (
        "sensitivity",
        "Window sensitivity: pruned test accuracy (left axis) and attack accuracy (right axis) per "
        "stride-width setting of a window defense.",
        lambda c, agg, root, zoom: draw_sensitivity(agg, zoom),
    ),
    (
        "tradeoff",
        "Privacy-utility trade-off: pruned test accuracy against the strongest attack's accuracy "
        "(mean over seeds); Base as the black star, the unpruned model as the dashed line.",
        lambda c, agg, root, zoom: draw_tradeoff_or_why(agg, zoom),
    ),
]


def save_figure(fig, path):
    for ext in ("png", "pdf"):
        atomic_write(f"{path}.{ext}", lambda f: fig.savefig(f, format=ext, dpi=120))  # noqa: B023 (called at once)
    pyplot().close(fig)


def write_report(
    out_dir: str, collected, root: str, sources: str = "", zoom: bool = False, resamples: int = RESAMPLES
) -> list:
    """OUT_DIR/results.csv (with the paired differences from Base), the figures (PNG and PDF) and report.md:
    the table, the paired comparison with Base, the mem-score bins, then each figure with its caption, or one
    line saying why it is left out. Returns the lines that say what was left out."""
    df = collected.table
    paired, problems = paired_table(df, root, resamples)
    csv = df.merge(paired.drop(columns="nonmembers", errors="ignore"), on=KEY, how="left") if len(paired) else df
    atomic_write(os.path.join(out_dir, "results.csv"), lambda f: f.write(csv.to_csv(index=False).encode()))
    agg = aggregate(df)
    problems = list(collected.problems) + problems
    lines = [
        "# Results",
        "",
        f"{len(df)} runs{sources}: the newest result of each attack per setting, one row per "
        "setting with mean ± standard deviation over seeds where several seeds ran it (column seeds). Every "
        "run, per seed: [results.csv](results.csv).",
        "",
        report_table(agg),
        "",
        TABLE_NOTE,
        "",
    ]
    left_out = []
    lines += ["## Defenses against Base (paired)", ""]
    if len(paired):
        lines += [
            f"Difference defense - Base of each attack metric on the same attacked samples, with its 95 % "
            f"paired bootstrap interval ({resamples} resamples of the samples, the same for both runs). "
            f'"changed": 0 lies outside the interval; otherwise these samples do not show that the '
            f"defense changed the attack.",
            "",
            paired_markdown(paired),
            "",
        ]
    else:
        left_out.append(
            "no paired comparison: no defense run with a scores file has a Base run of the same "
            "dataset, model, sparsity, seed and semantics with one"
        )
        lines += [f"_{left_out[-1]}_", ""]
    lines += ["## Mem-score bins", ""]
    try:
        bins = mechanism_table(df, root)
        fig = draw_mechanism(bins)
        save_figure(fig, os.path.join(out_dir, "mechanism"))
        lines += [
            mechanism_markdown(bins),
            "",
            "![mechanism](mechanism.png)",
            "",
            f"{MECHANISM_CAPTION} ([PDF](mechanism.pdf))",
            "",
        ]
    except NoData as why:
        left_out.append(f"no mechanism figure: {why}")
        lines += [f"_{left_out[-1]}_", ""]
    lines += ["## Figures", ""]
    for name, caption, draw in FIGURES:
        try:
            fig = draw(collected, agg, root, zoom)
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
