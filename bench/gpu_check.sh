#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it runs): on a machine with a CUDA GPU, run it as is
# and put its summary table in docs/performance.md. Under 8 minutes on one modern GPU; downloads nothing.
#
#   bash bench/gpu_check.sh [--cpu-dry-run] [OUT_DIR]
#
# --cpu-dry-run: the same items on the CPU with the smallest settings (CI runs it). OUT_DIR gets the logs and
# summary.txt (default: a temporary folder). It works in a scratch copy of the repo, so the repo's result/ and
# log/ are left alone. Exit status 1 if any item failed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dry=()
if [ "${1:-}" = "--cpu-dry-run" ]; then dry=(--cpu-dry-run); shift; fi
out=${1:-$(mktemp -d)}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$repo" && git ls-files -co --exclude-standard | grep -v -e '^result/' -e '^log/' | tar cf - -T -) | tar xf - -C "$work"
cd "$work"
export PYTHONUNBUFFERED=1
python bench/gpu_check.py "${dry[@]}" --out "$out"
