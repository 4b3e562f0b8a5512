"""The outputs of `summarize.py --plot` and `--report`: tradeoff.png, and report.md, which shows the results
table, the paired comparison with Base and the mem-score bins (reporting/tables.py) above each figure
(reporting/figures.py) with its caption, or a line saying why it is left out.
"""

import os

import pandas as pd

from common import atomic_write
from intervals import RESAMPLES
from reporting.figures import (
    draw_auc_bars,
    draw_bars,
    draw_iterations,
    draw_mechanism,
    draw_roc,
    draw_sensitivity,
    draw_sparsity,
    draw_tradeoff,
    draw_tradeoff_or_why,
    pyplot,
    roc_curves,
)
from reporting.results import KEY
from reporting.tables import (
    MECHANISM_CAPTION,
    TABLE_NOTE,
    NoData,
    aggregate,
    mechanism_markdown,
    mechanism_table,
    paired_markdown,
    paired_table,
    report_table,
)


def plot(df: pd.DataFrame, path: str, zoom: bool = False) -> None:
    """Write the privacy-utility trade-off figure (draw_tradeoff) to path, whole or not at all; its
    extension names the format."""
    fig = draw_tradeoff(df, zoom)
    try:
        fmt = os.path.splitext(path)[1][1:].lower()
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        pyplot().close(fig)


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
        "auc",
        "Victim test accuracy (bars, left axis) with the AUC of the strongest attacks (RMIA, LiRA, SAMIA, Conf as "
        "present; lines, right axis from chance, error bars as above) per model: the unpruned model first, then the "
        "fine-tuning control (sparsity 0, the same schedule, no weight removed) beside Base.",
        lambda c, agg, root, zoom: draw_auc_bars(agg),
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
