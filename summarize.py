"""Collect the runs' records and logs into one results table (CSV, Markdown), a privacy-utility plot,
and a report with figures.

    python summarize.py [LOG_DIR] [--result_dir DIR] [--out results.csv] [--markdown] [--plot FILE.png] [--all]
                        [--allow_empty]
    python summarize.py [LOG_DIR] [--result_dir DIR] --report OUT_DIR

The table comes from reporting/results.py (records first, then the logs, the release's own too), the figures and
report.md from reporting/report.py. Every output file is written whole or not at all (common.atomic_write), and the
output paths are checked before anything is read or written: a refused command changes no file. Errors
are one line, `error: <what is wrong>; <what to do>`, exit status 2 for the command line, 1 for a missing
or unusable folder or no results (common.main_guard): LOG_DIR must exist and hold results logs (--allow_empty
goes on with the records alone). Every file left out is named on stderr as `skipped <file>: <why>`; names that
are not UTF-8 reach the CSV and the Markdown as the bytes they were.
"""

import argparse
import os
import sys
import time

from common import MissingError, UsageError, atomic_write, main_guard
from intervals import RESAMPLES
from paths import RESULT_ROOT
from reporting.report import plot, write_report
from reporting.results import TEXT_COLUMNS, collect, log_files, to_markdown


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like the scripts' usage errors
        raise UsageError(f"{message}; see '{self.prog} --help'")


def get_args(argv=None):
    parser = Parser(description="Summarize prune/attack records and logs into one table.")
    parser.add_argument("log_dir", nargs="?", default="log")
    parser.add_argument("--result_dir", help="where the run records are (default: result/ beside LOG_DIR)")
    parser.add_argument("--out", default="results.csv", help="CSV file to write")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table to stdout")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        nargs="?",
        const="tradeoff.png",
        help="write the privacy-utility plot (default file: tradeoff.png)",
    )
    parser.add_argument(
        "--all", action="store_true", help="keep every run as its own row, not one row per configuration"
    )
    parser.add_argument("--report", metavar="DIR", help="write DIR/report.md, DIR/results.csv and the figures")
    parser.add_argument(
        "--zoom",
        action="store_true",
        help="let attack-accuracy axes start at the data instead of 50%% (chance); labelled 'axis zoomed'",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=RESAMPLES,
        metavar="N",
        help="resamples of the report's paired intervals against Base (default: %(default)s)",
    )
    parser.add_argument(
        "--allow_empty",
        action="store_true",
        help="go on when LOG_DIR is missing or holds no results logs (the table then comes from the "
        "records alone, and may be empty)",
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap is a number of resamples (at least 1), got {args.bootstrap}")
    if args.plot is not None and not os.path.splitext(args.plot)[1]:
        args.plot += ".png"  # matplotlib's own default for a name without extension
    return args


def check_not_a_file(path, what, fix):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a folder; {fix}")


def check_folder(folder, what):
    """`folder`, which `what` writes into, exists and is writable."""
    if not os.path.exists(folder):
        raise MissingError(
            f"folder {folder} for {what} not found; create it first, or pass a path in an existing folder"
        )
    if not os.path.isdir(folder):
        raise MissingError(
            f"{folder} for {what} is a file, not a folder; move that file away, or pass a path in a folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MissingError(
            f"folder {folder} for {what} is not writable; fix its permissions, or pass a path "
            f"in a folder you can write to"
        )


def check_output_file(path, flag):
    if os.path.isdir(path):
        raise UsageError(
            f"{flag} {path} is a folder; pass a file name, e.g. {flag} "
            f"{os.path.join(path, 'results.csv' if flag == '--out' else 'tradeoff.png')}"
        )
    check_folder(os.path.dirname(path) or ".", f"{flag} {path}")


def check_plot_format(path):
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1][1:].lower()
    known = FigureCanvasBase.get_supported_filetypes()
    if ext not in known:
        raise UsageError(
            f"--plot {path}: matplotlib cannot write .{ext} files; use one of "
            f"{', '.join('.' + e for e in sorted(known))}"
        )


def check_outputs(args):
    """Every file this run will write can be written, before anything is read or written."""
    if args.report:
        check_not_a_file(args.report, "--report", "pass a folder name (it is created if missing)")
        check_folder(
            args.report if os.path.isdir(args.report) else os.path.dirname(args.report) or ".",
            f"--report {args.report}",
        )
        return
    check_output_file(args.out, "--out")
    if args.plot:
        check_output_file(args.plot, "--plot")
        check_plot_format(args.plot)


def displayable(df):
    """df with names that are not UTF-8 (surrogate escapes) shown with U+FFFD: fonts cannot draw the escapes."""
    fix = lambda v: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
    return df.assign(**{col: df[col].map(fix) for col in df.columns if col in TEXT_COLUMNS})


def main(argv=None):
    args = get_args(argv)
    result_dir = args.result_dir or os.path.join(os.path.dirname(os.path.abspath(args.log_dir)), RESULT_ROOT)
    check_not_a_file(args.log_dir, "LOG_DIR", "pass the folder that holds the <ds>_<model>/ log folders (default: log)")
    if args.result_dir:
        check_not_a_file(
            result_dir,
            "--result_dir",
            "pass the folder that holds <ds>_<model>/records/ (default: result/ beside LOG_DIR)",
        )
    check_outputs(args)
    if not os.path.isdir(args.log_dir) and not args.allow_empty:
        raise MissingError(
            f"LOG_DIR {args.log_dir} not found; pass the folder prune_modi.py/mia_modi.py log to "
            f"(default: log), or --allow_empty to summarize the run records under {result_dir} alone"
        )
    # Names that are not UTF-8 (os.listdir's surrogate escapes) go out as the bytes they were.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    unusable = []
    if not log_files(args.log_dir, unusable) and not args.allow_empty:
        for problem in unusable:
            print(f"skipped {problem}", file=sys.stderr)
        raise MissingError(
            f"LOG_DIR {args.log_dir} holds no results logs (<ds>_<model>/<pruner>_<sparsity>_"
            f"<defend>.txt); pass the folder prune_modi.py/mia_modi.py log to, or --allow_empty to "
            f"summarize the run records under {result_dir} alone"
        )
    collected = collect(args.log_dir, result_dir, newest_only=not args.all)
    df = collected.table
    if not args.report or df.empty:  # (the report lists them itself)
        for problem in collected.problems:
            print(f"skipped {problem}", file=sys.stderr)
    if df.empty and (not args.allow_empty or args.report):
        raise MissingError(
            f"no results under {args.log_dir} and no run records under {result_dir}; run "
            f"prune_modi.py and mia_modi.py first, or pass the folder they log to"
        )
    if args.report:
        started = time.time()
        sources = f" from {args.log_dir} and {result_dir}"
        shown = collected._replace(table=displayable(df))
        for line in write_report(args.report, shown, os.path.dirname(result_dir), sources, args.zoom, args.bootstrap):
            print(line, file=sys.stderr)
        print(f"wrote {os.path.join(args.report, 'report.md')} ({time.time() - started:.1f}s)", file=sys.stderr)
        return
    atomic_write(args.out, lambda f: f.write(df.to_csv(index=False).encode(errors="surrogateescape")))
    print(f"wrote {len(df)} rows to {args.out}", file=sys.stderr)
    if args.markdown:
        print(to_markdown(df))
    if args.plot and df.empty:
        print(f"no rows: no plot written to {args.plot}", file=sys.stderr)
    elif args.plot:
        plot(displayable(df), args.plot, args.zoom)
        print(f"wrote plot to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
