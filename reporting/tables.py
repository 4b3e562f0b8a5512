"""The report's numbers: runs aggregated over seeds and the Markdown results table, each defense paired with
Base on the same samples, the victim's pruning iterations, and the mean member score per mem-score decile."""

import math
import os

import numpy as np
import pandas as pd

import paths
from attacks import _rankable
from intervals import FPR_TARGETS, RESAMPLES, align, measurable, paired_difference, read_attacked
from records import record_time
from reporting.results import KEY, METRICS, TEXT_COLUMNS, value

DIGITS = {"auc": 4}  # decimals in the report's table by column suffix; 3 elsewhere, as in the logs


class NoData(Exception):
    """A figure without the data it needs; the message says why."""


def run_label(row):
    """A run's name in legends: defense [argument] [tag] [(corrected)] [, Base shadows]; "unpruned" for
    --original, "fine-tuned, not pruned" for Base at sparsity 0."""
    if row.get("setting") == "original":
        return "unpruned"
    name = "Base" if row["defense"] == "base" else row["defense"]
    if row.get("sparsity") == 0:  # the fine-tuning control: the same schedule, no weight removed
        name = "fine-tuned, not pruned" if name == "Base" else f"{name}, not pruned"
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


def with_labels(df):
    return df.assign(group=df["dataset"] + "_" + df["model"], label=[run_label(row) for row in df.to_dict("records")])


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
