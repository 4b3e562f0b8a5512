"""audit.py summarize's outputs (docs/audit.md): the audit table (audit.csv, one row per attacked stage, i.e. per
defense and setting, plus the unpruned models), the privacy-utility plane (TPR at 1 % and 0.1 % FPR on the
audited rows against test accuracy) and the mechanism tables by mem-score decile.

Cells of the Markdown tables read `value [95 % interval]`; a TPR at an FPR that rests on fewer than ten false
positives (intervals.measurable over the pooled non-member decisions) is `n/m`, as in summarize.py's report.
audit.csv keeps every value and the non-member decision counts (<subset>_nonmembers) to tell, as results.csv does.
"""

import io
import math

import numpy as np
import pandas as pd

from auditing.tuning import front
from defenses import DEFENSES
from intervals import measurable

ATTACKS = ("LiRA", "RMIA")
SUBSETS = ("audited", "all")
SHORT = {"AUC": "auc", "TPR@1%FPR": "tpr1", "TPR@0.1%FPR": "tpr01"}
NOT_MEASURABLE = "n/m"
ORDER = ["unpruned"] + list(DEFENSES)


def setting_text(record) -> str:
    """The settings that tell one run of a defense from another, in words."""
    cls, s = DEFENSES.get(record["defense"]), record.get("settings") or {}
    if is_control(record):
        return "sparsity 0: fine-tuned, not pruned"
    if cls is None:
        return ""
    parts = []
    if cls.window:
        parts.append(f"stride {s.get('stride')}, width {s.get('width')}")
    if hasattr(cls, "risk_split"):  # RMR and SWMR: the risk side's threshold and weight decay
        parts.append(f"mem_thre {s.get('mem_thre'):g}, weight_decay_mem {s.get('weight_decay_mem'):g}")
    if cls.arg_in_name:
        parts.append(f"{'noise' if cls.name == 'dp' else 'defend_arg'} {float(s.get('defend_arg')):g}")
    return "; ".join(parts)


def is_control(record) -> bool:
    """The fine-tuning control: Base at sparsity 0 (the same schedule, no weight removed)."""
    return record["defense"] == "base" and float((record.get("pruning") or {}).get("prune_sparsity", 1)) == 0


def row_label(record) -> str:
    setting = setting_text(record)
    return record["defense"] + (f" ({setting})" if setting else "")


def ordered(records) -> list:
    """Unpruned, the fine-tuning control, Base, then the defenses in registry order (each by stage name)."""
    rank = lambda r: -1 if is_control(r) else ORDER.index(r["defense"]) if r["defense"] in ORDER else len(ORDER)
    return sorted(records, key=lambda r: (r["defense"] != "unpruned", rank(r), r["stage"]))


def audit_table(records) -> pd.DataFrame:
    """One row per record: the run, test accuracy over the models (mean, std, min, max), and per attack and subset
    (audited rows, all rows) AUC, TPR@1%FPR, TPR@0.1%FPR with their 95 % cluster-bootstrap bounds (_lo, _hi),
    and the subset's member and non-member decision counts."""
    rows = []
    for r in ordered(records):
        acc = np.array([float(a) for a in r["test_acc"]])
        row = {
            "defense": r["defense"],
            "setting": setting_text(r),
            "stage": r["stage"],
            "semantics": r.get("semantics") or "",
            "models": r["models"],
            "audited": r["audited"],
            "audited_rows": r["audited_rows"],
            "test_acc": acc.mean(),
            "test_acc_std": acc.std(ddof=1) if len(acc) > 1 else math.nan,
            "test_acc_min": acc.min(),
            "test_acc_max": acc.max(),
            "dp_noise": math.nan if r.get("dp_noise") is None else float(r["dp_noise"]),
            **epsilon_columns(r),
            **target_columns(r, acc.mean()),
        }
        for subset in SUBSETS:
            first = r["attacks"][ATTACKS[0]][subset]
            row[f"{subset}_members"], row[f"{subset}_nonmembers"] = first["members"], first["nonmembers"]
        for attack in ATTACKS:
            for subset in SUBSETS:
                found = r["attacks"][attack][subset]
                for metric, short in SHORT.items():
                    value, lo, hi = (float(x) for x in found[metric])
                    key = f"{attack}_{subset}_{short}"
                    row[key], row[f"{key}_lo"], row[f"{key}_hi"] = value, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


EPSILON_COLUMNS = ("dp_epsilon_min", "dp_epsilon_median", "dp_epsilon_max")
EPSILON_NOTE = (
    "ε (δ = 1e-5): the range over the models of DP-SGD's guarantee for the dp fine-tuning only; the pretraining on "
    "the same rows is not private."
)


def epsilon_columns(record) -> dict:
    """dp_epsilon_min, _median, _max over the models of a dp record (each audited model has its own ε: its
    accountant counts its own steps); nan for the other defenses."""
    epsilons = record.get("dp_epsilons")
    if not epsilons and record.get("dp_epsilon") is not None:  # an older record: one ε when all models agreed
        epsilons = [record["dp_epsilon"]]
    if not epsilons:
        return dict.fromkeys(EPSILON_COLUMNS, math.nan)
    values = np.array([math.nan if e is None else float(e) for e in epsilons])
    return dict(zip(EPSILON_COLUMNS, (values.min(), np.median(values), values.max())))


def target_columns(record, test_acc) -> dict:
    """For a tuned stage (audit.py tune's choice): the tuning target and tolerance, and whether the audited mean
    test accuracy is below target - tolerance (misses_target); nan and False for the others."""
    tuned = record.get("tuned")
    if not tuned:
        return {"target_acc": math.nan, "tolerance": math.nan, "misses_target": False}
    target, tolerance = float(tuned["target_acc"]), float(tuned["tolerance"])
    return {"target_acc": target, "tolerance": tolerance, "misses_target": bool(test_acc < target - tolerance)}


def leak_key(table) -> str:
    """The audited rows' LiRA column that ranks leakage: TPR@1%FPR where measurable, else AUC."""
    outs = int(table["audited_nonmembers"].min()) if len(table) else 0
    return "LiRA_audited_tpr1" if measurable("TPR@1%FPR", outs) else "LiRA_audited_auc"


def best_baseline(table, ordered):
    """The record of the least-leaking baseline row (the paper's baselines, Defense.baseline) by leak_key among
    those that do not miss their tuning target (misses_target), or None: the strongest non-WeMeM defense at the
    matched utility, which each row is compared with."""
    rows = [
        i
        for i, r in enumerate(ordered)
        if r["defense"] in DEFENSES
        and DEFENSES[r["defense"]].baseline
        and str(table["misses_target"].iloc[i]) != "True"
    ]
    if not rows:
        return None
    key = leak_key(table)
    return ordered[min(rows, key=lambda i: (table[key].iloc[i], -table["test_acc"].iloc[i]))]


def table_label(row) -> str:
    """A row's name in the Markdown table: the defense, its setting and, for dp, the models' ε range."""
    parts = [row["setting"]] if isinstance(row["setting"], str) and row["setting"] else []  # nan read from a CSV
    if math.isfinite(row.get("dp_epsilon_median", math.nan)):
        parts.append(f"ε {row['dp_epsilon_min']:.1f}-{row['dp_epsilon_max']:.1f}")
    if str(row.get("misses_target")) == "True":  # a bool, or its text in a CSV read back
        parts.append(f"**below the tuning target {row['target_acc'] - row['tolerance']:.1f}**")
    return row["defense"] + (f" ({', '.join(parts)})" if parts else "")


def cell(row, attack, subset, metric) -> str:
    key = f"{attack}_{subset}_{SHORT[metric]}"
    if not measurable(metric, int(row[f"{subset}_nonmembers"])):
        return NOT_MEASURABLE
    digits = 3 if metric == "AUC" else 1
    return f"{row[key]:.{digits}f} [{row[key + '_lo']:.{digits}f}, {row[key + '_hi']:.{digits}f}]"


def markdown_table(table: pd.DataFrame) -> str:
    """The audit table as Markdown: test accuracy mean ± std, then per attack the audited rows' TPRs and AUC and
    all rows' TPR@1%FPR and AUC."""
    head = ["defense", "test acc (%)"]
    picks = [(a, "audited", m) for a in ATTACKS for m in ("TPR@0.1%FPR", "TPR@1%FPR", "AUC")]
    picks += [(a, "all", m) for a in ATTACKS for m in ("TPR@1%FPR", "AUC")]
    head += [f"{a} {s} {m}" for a, s, m in picks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        acc = f"{row['test_acc']:.1f} ± {row['test_acc_std']:.1f}"
        lines.append("| " + " | ".join([table_label(row), acc] + [cell(row, *p) for p in picks]) + " |")
    counts = table.iloc[0]
    lines.append(
        f"\n{counts['models']} models; audited rows: {counts['audited_rows']} ({counts['audited']}), "
        f"{counts['audited_nonmembers']} non-member decisions pooled over the models; all rows: "
        f"{counts['all_nonmembers']}. {NOT_MEASURABLE}: the FPR rests on fewer than ten false positives."
        + (f" {EPSILON_NOTE}" if table["dp_epsilon_median"].notna().any() else "")
    )
    return "\n".join(lines)


PAIRED_WITH = {"vs_base": "Base", "vs_baseline": "the best baseline"}


def paired_markdown(table: pd.DataFrame, suffix: str = "vs_base") -> str:
    """Each row minus Base (or the best baseline: suffix vs_baseline) on the same decisions (paired
    cluster-bootstrap 95 % intervals): the audited rows' TPR@1%FPR and AUC per attack. An interval that excludes 0
    is a difference; one that holds 0 is none."""
    picks = [(a, "audited", m) for a in ATTACKS for m in ("TPR@1%FPR", "AUC")]
    head = [f"defense minus {PAIRED_WITH[suffix]} (paired)"] + [f"{a} {s} {m}" for a, s, m in picks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        if not math.isfinite(row.get(f"LiRA_audited_auc_{suffix}", math.nan)):  # the reference itself, or none
            continue
        cells = []
        for attack, subset, metric in picks:
            key = f"{attack}_{subset}_{SHORT[metric]}_{suffix}"
            digits = 3 if metric == "AUC" else 1
            if not measurable(metric, int(row[f"{subset}_nonmembers"])):
                cells.append(NOT_MEASURABLE)
            else:
                cells.append(f"{row[key]:+.{digits}f} [{row[key + '_lo']:+.{digits}f}, {row[key + '_hi']:+.{digits}f}]")
        lines.append(
            "| " + " | ".join([row["defense"] + (f" ({row['setting']})" if row["setting"] else "")] + cells) + " |"
        )
    return "\n".join(lines)


def seeds_table(tables: dict) -> pd.DataFrame:
    """One row per stage over several seeds' audit tables ({seed: audit.csv's table}; a tuned stage, whose setting
    and so, for a baseline, whose name differs by seed, is one row per defense and semantics): per seed its mean test
    accuracy, its leakage (LiRA on the audited rows, leak_key of that table) and whether its paired interval
    against Base and against the best baseline lies below 0; then the spread over the seeds (mean, sample std)
    and in how many seeds each interval lies below 0 (lower_than_base, lower_than_baseline, of n_seeds)."""
    rows = {}
    for seed, table in sorted(tables.items()):
        key = leak_key(table)
        for _, row in table.iterrows():
            tuned = str(row["stage"]).endswith("_tag-tuned")  # its setting (and a baseline's name) differs by seed
            identity = f"{row['defense']} tuned {row.get('semantics', '')}" if tuned else row["stage"]
            label = f"{row['defense']} (tuned)" if tuned else table_label(row)
            out = rows.setdefault(identity, {"stage": identity, "label": label, "seeds": []})
            hi = {suffix: row.get(f"{key}_{suffix}_hi", math.nan) for suffix in PAIRED_WITH}
            out["seeds"].append(
                {
                    "seed": seed,
                    "test_acc": row["test_acc"],
                    "leak": row[key],
                    "metric": key,
                    **{f"below_{suffix}": bool(hi[suffix] < 0) for suffix in PAIRED_WITH},
                }
            )
    lines = []
    for out in rows.values():
        per = out.pop("seeds")
        accs, leaks = np.array([p["test_acc"] for p in per]), np.array([p["leak"] for p in per])
        lines.append(
            {
                **out,
                "n_seeds": len(per),
                "metric": per[0]["metric"],
                **{f"test_acc_{p['seed']}": p["test_acc"] for p in per},
                **{f"leak_{p['seed']}": p["leak"] for p in per},
                "test_acc_mean": accs.mean(),
                "test_acc_std": accs.std(ddof=1) if len(per) > 1 else math.nan,
                "leak_mean": leaks.mean(),
                "leak_std": leaks.std(ddof=1) if len(per) > 1 else math.nan,
                "lower_than_base": sum(p["below_vs_base"] for p in per),
                "lower_than_baseline": sum(p["below_vs_baseline"] for p in per),
            }
        )
    return pd.DataFrame(lines)


def seeds_markdown(table: pd.DataFrame, seeds) -> str:
    """seeds_table as Markdown: per stage the seeds' leakage, its mean ± std, the test accuracy's, and the number
    of seeds in which the paired interval against Base (the best baseline) lies below 0."""
    metric = {"LiRA_audited_tpr1": "LiRA TPR@1%FPR (%)", "LiRA_audited_auc": "LiRA AUC"}[table["metric"].iloc[0]]
    head = ["defense", "test acc (%)", *[f"{metric}, seed {s}" for s in seeds], f"{metric}, mean ± std"]
    head += ["lower than Base (seeds)", "lower than the best baseline (seeds)"]
    digits = 3 if "AUC" in metric else 1
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        leaks = [f"{row.get(f'leak_{s}', math.nan):.{digits}f}" for s in seeds]
        cells = [row["label"], f"{row['test_acc_mean']:.1f} ± {row['test_acc_std']:.1f}", *leaks]
        cells += [f"{row['leak_mean']:.{digits}f} ± {row['leak_std']:.{digits}f}"]
        cells += [f"{row['lower_than_base']} of {row['n_seeds']}", f"{row['lower_than_baseline']} of {row['n_seeds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nA seed counts when the paired 95 % interval of the difference lies below 0 on that seed's draws "
        "(canaries, halves, initialisations); the other seeds' intervals hold 0 or lie above it."
    )
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plane_style(defense: str, setting: str = "") -> tuple:
    """(name, colour, marker) of a row on the plane: the unpruned models light grey, the fine-tuning control dark
    grey diamonds, Base black, each defense with a search space its own colour (the same in every panel)."""
    tunable = [name for name, cls in DEFENSES.items() if cls.search_space]
    if defense == "unpruned":
        return "unpruned", "silver", "o"
    if str(setting).startswith("sparsity 0"):
        return "fine-tuned, not pruned", "dimgrey", "D"
    if defense == "base":
        return "Base", "black", "o"
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "darkgoldenrod"]  # no grey (C7): the control's
    colour = palette[tunable.index(defense) % len(palette)] if defense in tunable else "tab:brown"
    return defense, colour, "o"


def draw_plane(table: pd.DataFrame, tunings=()):
    """The privacy-utility plane, one colour per defense in every panel (plane_style). With tunings ([(defense,
    its tuned record's "tuned")], audit.py tune's choices), a first panel: each tuned defense's trials on the
    tuning models (faint), its front (a line), its chosen setting (a star), the Base reference (black x) and the
    target minus the tolerance (dashed), on the tuning objectives (dev accuracy, the tuning leakage). Then a panel
    per measurable TPR (1 %, 0.1 % FPR; AUC when neither is) of LiRA on the audited rows against mean test
    accuracy: each row one point, error bars the models' test-accuracy std and the 95 % interval."""
    plt = pyplot()
    tunings = list(tunings)
    outs = int(table["audited_nonmembers"].min())
    metrics = [m for m in ("TPR@1%FPR", "TPR@0.1%FPR") if measurable(m, outs)] or ["AUC"]
    width = len(metrics) + bool(tunings)
    fig, axes = plt.subplots(1, width, figsize=(5.2 * width + 2.2, 4.6), squeeze=False)
    axes = list(axes[0])
    if tunings:
        draw_tuning(axes.pop(0), tunings)
    unmeasured = [m for m in ("TPR@1%FPR", "TPR@0.1%FPR") if m not in metrics]
    for ax, metric in zip(axes, metrics):
        key = f"LiRA_audited_{SHORT[metric]}"
        for _, row in table.iterrows():
            name, colour, marker = plane_style(row["defense"], row["setting"])
            ax.errorbar(
                row["test_acc"],
                row[key],
                xerr=row["test_acc_std"],
                yerr=[[row[key] - row[key + "_lo"]], [row[key + "_hi"] - row[key]]],
                fmt=marker,
                color=colour,
                capsize=3,
                label=name,
            )
        ax.set_xlabel("test accuracy (%), mean ± std over the audited models")
        ax.set_ylabel(f"LiRA {metric} on the audited rows" + (" (%)" if metric != "AUC" else ""))
        title = f"audited: LiRA {metric}, 95 % intervals"
        if unmeasured:
            title += f"\n({', '.join(unmeasured)} {NOT_MEASURABLE}: {outs} non-member decisions)"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in fig.axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (5.2 * width + 2.2), 1))
    return fig


def draw_tuning(ax, tunings) -> None:
    """The tuning panel of draw_plane (see there)."""
    metric = tunings[0][1]["leak_metric"]
    for defense, tuned in tunings:
        _, colour, _ = plane_style(defense)
        trials = tuned["trials"]
        ax.scatter([t["acc"] for t in trials], [t["leak"] for t in trials], color=colour, alpha=0.25, s=14)
        edge = sorted(front(trials), key=lambda t: t["acc"])
        ax.plot([t["acc"] for t in edge], [t["leak"] for t in edge], color=colour, lw=1)
        chosen = tuned["chosen"]
        ax.scatter([chosen["acc"]], [chosen["leak"]], color=colour, marker="*", s=130, edgecolor="black", zorder=3)
    reference = tunings[0][1]["reference"]
    ax.scatter([reference["acc"]], [reference["leak"]], color="black", marker="x", s=60, label="Base (tuning)")
    edge = tunings[0][1]["target_acc"] - tunings[0][1]["tolerance"]
    ax.axvline(edge, color="grey", ls="--", lw=1, label="tuning target - tolerance")
    ax.set_xlabel("dev accuracy (%), mean over the tuning models")
    ax.set_ylabel(f"LiRA {metric} on the audited rows")
    ax.set_title("tuning models: trials (faint), front (line), choice (star)", fontsize=9)
    ax.grid(alpha=0.3)


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        pyplot().close(fig)
    return buffer.getvalue()


def deciles_markdown(panels, plan) -> str:
    """panels: (row label, attack, decile rows as loo_attacks.decile_table gives them)."""
    lines = [
        "# Attack success by mem-score decile",
        "",
        f"Mem-scores: the audit's own estimate from its {plan.models} pretrained models (Feldman's estimator on the "
        "training labels, canaries included). Decile 1 holds the lowest scores. The threshold is fixed on all pooled "
        "non-member decisions, so the deciles are comparable.",
    ]
    for label, attack, rows in panels:
        if not rows:
            continue
        keys = list(rows[0])
        lines += ["", f"## {label}, {attack}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
        lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
