"""Collect the runs' records and logs into one results table (CSV, Markdown), a privacy-utility plot,
and a report with figures.

    python summarize.py [LOG_DIR] [--result_dir DIR] [--out results.csv] [--markdown] [--plot FILE.png] [--all]
    python summarize.py [LOG_DIR] [--result_dir DIR] --report OUT_DIR

The table comes from results.py (records first, then the logs, the release's own too), the figures and
report.md from report.py.
"""
import argparse
import os
import sys
import time

from paths import RESULT_ROOT
from report import plot, write_report
from results import collect, to_markdown


def main():
    parser = argparse.ArgumentParser(description="Summarize prune/attack records and logs into one table.")
    parser.add_argument("log_dir", nargs="?", default="log")
    parser.add_argument("--result_dir", help="where the run records are (default: result/ beside LOG_DIR)")
    parser.add_argument("--out", default="results.csv", help="CSV file to write")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table to stdout")
    parser.add_argument("--plot", metavar="FILE.png", nargs="?", const="tradeoff.png",
                        help="write the privacy-utility plot (default file: tradeoff.png)")
    parser.add_argument("--all", action="store_true", help="keep every entry, not only the newest per config")
    parser.add_argument("--report", metavar="DIR", help="write DIR/report.md, DIR/results.csv and the figures")
    args = parser.parse_args()
    result_dir = args.result_dir or os.path.join(os.path.dirname(os.path.abspath(args.log_dir)), RESULT_ROOT)
    if not os.path.isdir(args.log_dir) and not os.path.isdir(result_dir):
        sys.exit(f"error: log directory {args.log_dir} not found; pass the folder prune_modi.py/mia_modi.py log to")
    collected = collect(args.log_dir, result_dir, newest_only=not args.all)
    df = collected.table
    if df.empty:
        sys.exit(f"error: no results logs (<ds>_<model>/<pruner>_<sparsity>_<defend>.txt) under {args.log_dir} "
                 f"and no run records under {result_dir}")
    if args.report:
        started = time.time()
        sources = f" from {args.log_dir} and {result_dir}"
        for line in write_report(args.report, collected, os.path.dirname(result_dir), sources):
            print(line, file=sys.stderr)
        print(f"wrote {os.path.join(args.report, 'report.md')} ({time.time() - started:.1f}s)", file=sys.stderr)
        return
    for problem in collected.problems:
        print(f"skipped {problem}", file=sys.stderr)
    df.to_csv(args.out, index=False)
    print(f"wrote {len(df)} rows to {args.out}", file=sys.stderr)
    if args.markdown:
        print(to_markdown(df))
    if args.plot:
        plot(df, args.plot)
        print(f"wrote plot to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
