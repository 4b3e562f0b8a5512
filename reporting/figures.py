"""The report's figures, drawn with matplotlib: the privacy-utility trade-off, log-log ROC curves from the saved
member scores, attack results against sparsity, the paper's bars, accuracy per pruning iteration, window
sensitivity and the mem-score bins."""

import math
import os

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from attacks import _rankable
from reporting.tables import BINS, NoData, iteration_table, run_label, with_labels

CHANCE = 50.0  # attack accuracy (%) of a coin flip: where attack-accuracy axes start unless zoomed


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


STRONG = ("SAMIA", "Mentr", "LiRA")  # the attacks the ROC and sparsity figures show, as far as present


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def color_of(label, labels):
    """Base black, the unpruned model grey, the others in the default cycle by their place in `labels`."""
    if label.startswith("Base"):
        return "black"
    if label == "unpruned":
        return "grey"
    others = [x for x in labels if not x.startswith("Base") and x != "unpruned"]
    return f"C{others.index(label) % 10}"


def shown_attacks(df):
    """The STRONG attacks with results in df, else every attack with an accuracy."""
    present = [c[: -len("_acc")] for c in attack_accuracy_columns(df) if df[c].notna().any()]
    return [a for a in STRONG if a in present] or present


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


AUC_ATTACKS = ("RMIA", "LiRA", "SAMIA", "Conf")  # the strongest first: the attacks the AUC bars show, as present


def draw_auc_bars(agg):
    """Pruned test accuracy as bars per model (left axis) and the AUC of the strongest attacks (AUC_ATTACKS, as
    present) as lines over them with their error bars (right axis, from 0.5); the unpruned model first and the
    fine-tuning control (sparsity 0) beside Base, in every sparsity's panel. AUC, not attack accuracy: an attack
    that calls every sample a non-member has the share of non-members as its accuracy whatever the model."""
    df = with_labels(agg[agg["setting"].notna() & (agg["setting"] != "original") & agg["pruned_acc"].notna()])
    control, pruned = df[df["sparsity"] == 0], df[df["sparsity"] > 0]
    attacks = [a for a in AUC_ATTACKS if f"{a}_auc" in df.columns and df[f"{a}_auc"].notna().any()]
    if pruned.empty or not attacks:
        raise NoData(f"no pruned run with {', '.join(AUC_ATTACKS[:-1])} or {AUC_ATTACKS[-1]} AUCs")
    panels = list(dict.fromkeys(zip(pruned["group"], pruned["sparsity"])))
    n_bars = max(len(pruned[pruned["group"] == g]) for g, _ in panels) + 2
    fig, axes = panel_grid(1, len(panels), width=max(4.4, 0.9 * n_bars + 2))
    for (group, sparsity), ax in zip(panels, axes[0]):
        unpruned = {"label": "unpruned", "pruned_acc": unpruned_reference(agg, group, "pretrained_acc")}
        for col in (f"{a}_auc{end}" for a in attacks for end in ("", "_lo", "_hi")):
            unpruned[col] = unpruned_reference(agg, group, col)
        d = pd.concat(
            [
                pd.DataFrame([unpruned] if not math.isnan(unpruned["pruned_acc"]) else []),
                control[control["group"] == group],
                pruned[(pruned["group"] == group) & (pruned["sparsity"] == sparsity)],
            ],
            ignore_index=True,
        )
        x = np.arange(len(d))
        err = np.nan_to_num(np.asarray(std_of(d, "pruned_acc"), dtype=float))
        colors = ["gainsboro" if lab == "unpruned" else "lightsteelblue" for lab in d["label"]]
        ax.bar(x, d["pruned_acc"], yerr=err if err.any() else None, color=colors, edgecolor="black", capsize=3)
        ax.set_ylim(max(0, d["pruned_acc"].min() - 15), 100)
        ax.set_xticks(x, d["label"], rotation=30, ha="right")
        ax.set_ylabel("victim test accuracy (%)")
        ax.set_title(f"{group}, sparsity {sparsity:g}")
        twin = ax.twinx()
        for i, attack in enumerate(attacks):
            offset = (i - (len(attacks) - 1) / 2) * 0.08  # side by side, so the intervals do not hide each other
            col = f"{attack}_auc"
            style = dict(marker="osD^"[i % 4], color=f"C{3 + i}", label=f"{attack} AUC")
            plot_with_error(twin, x + offset, d[col], error_of(d, col), **style)
        tops = [d[c].max() for a in attacks for c in (f"{a}_auc", f"{a}_auc_hi") if c in d.columns]
        twin.set_ylim(0.5, max(0.75, np.nanmax(tops) + 0.02))
        twin.set_ylabel("attack AUC (0.5 = chance)")
    shared_legend(fig, twin)
    return fig


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
