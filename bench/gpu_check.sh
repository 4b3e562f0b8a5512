#!/usr/bin/env bash
# GPU check, prepared once: run it as is on a machine with a CUDA GPU and put its numbers in the
# docs/performance.md. Downloads nothing (digits ships with scikit-learn; the image model
# runs on CIFAR-shaped random tensors) and takes well under 8 minutes on one modern GPU:
#   1. the CUDA path of the three scripts on digits (GPU-ID 0), each timed, with their GPU log line;
#   2. python grid.py grids/digits.json --backend local --gpus 0 (the README's main job), timed;
#   3. bench/bench_train.py --device cuda:0 for resnet18, without and with --amp, and the peak memory.
# Without CUDA it says so and exits 0 after the CPU part (a tiny bench_train run).
#
#   bash bench/gpu_check.sh [OUT_DIR]     (OUT_DIR: where the logs go; default a temporary folder)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
(cd "$repo" && git ls-files -co --exclude-standard | tar cf - -T -) | tar xf - -C "$work"  # result/ and log/ stay out of the repo
trap 'rm -rf "$work"' EXIT
cd "$work"
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run, time, keep the output
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1 || { echo "FAILED ($?): see $out/$name.log"; tail -n 5 "$out/$name.log"; return 1; }
    echo "   $((SECONDS - start)) s"
}

echo "== CPU part"
OMP_NUM_THREADS=1 step cpu_bench_tiny python bench/bench_train.py --tiny --only columnfc
grep -A4 "one epoch" "$out/cpu_bench_tiny.log"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU on this machine: the CPU part ran, the GPU part is skipped"
    exit 0
fi
python -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

digits=./config/digits.json
step pretrain python pretrain_modi.py 0 $digits --shadow_num 5 --quiet --no_tensorboard
step prune python prune_modi.py 0 $digits --pruner_name iter_prunetxt --prune_sparsity 0.6 --prune_iter 5 --quiet --no_tensorboard
step attack python mia_modi.py 0 $digits --pruner_name iter_prunetxt --prune_sparsity 0.6 --attacks threshold,samia --quiet --no_tensorboard
grep -h "^GPU: " log/digits_columnfc/*.txt | sed 's/^/   /'
grep -h "attack accuracy" log/digits_columnfc/iter_prunetxt_0.6_base.txt | sed 's/^/   /'

rm -rf result log
step grid python grid.py grids/digits.json --backend local --gpus 0
tail -n 3 "$out/grid.log" | sed 's/^/   /'

step bench_resnet18 python bench/bench_train.py --device cuda:0 --only resnet18
step bench_resnet18_amp python bench/bench_train.py --device cuda:0 --only resnet18 --amp
cat "$out/bench_resnet18.log" "$out/bench_resnet18_amp.log" | grep -v Warning
echo "== logs in $out"
