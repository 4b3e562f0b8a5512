#!/usr/bin/env bash
# The baselines the paper compares WeMeM against: ppb 4, adv 2, relaxloss 1 and dp 0.1, each used to
# prune + fine-tune the victim and its shadows (sparsity 0.6, 5 iterations), then attacked adaptively
# with threshold,samia.
#
#   bash run_custom.sh                the release's CIFAR10-ResNet18 and Location-FC sections (GPU 0);
#                                     pretrain first, as in the release (e.g. bash run_shell.sh)
#   bash run_custom.sh digits [GPU [FLAGS]]   the bundled digits data (GPU-ID default -1, the CPU);
#                                     pretrains first if there is no finished victim yet; FLAGS (e.g.
#                                     --semantics corrected) go to every prune and attack command
set -euo pipefail
cd "$(dirname "$0")"  # the scripts read config/ and write result/, log/ relative to the repo root

usage() {
    echo "usage: bash run_custom.sh [digits [GPU-ID [FLAGS]]]  (no argument: the release's CIFAR10-ResNet18 and Location-FC runs)" >&2
    exit 2
}

# run_baselines GPU CONFIG PRUNER: prune under each baseline, then attack with shadows pruned the same way
run_baselines() {
    local gpu=$1 config=$2 pruner=$3 defend arg
    for baseline in "ppb 4" "adv 2" "relaxloss 1" "dp 0.1"; do
        read -r defend arg <<<"$baseline"
        python prune_modi.py "$gpu" "$config" --pruner_name "$pruner" --prune_sparsity 0.6 --prune_iter 5 \
            --defend "$defend" --defend_arg "$arg" "${EXTRA[@]}"
        python mia_modi.py "$gpu" "$config" --pruner_name "$pruner" --prune_sparsity 0.6 \
            --attacks threshold,samia --defend "$defend" --defend_arg "$arg" --adaptive "${EXTRA[@]}"
    done
}

EXTRA=()
case "${1:-}" in
    "")
        [ $# -le 1 ] || usage
        run_baselines 0 ./config/cifar10_resnet18.json iter_pruning
        run_baselines 0 ./config/location.json iter_prunetxt
        ;;
    digits)
        EXTRA=("${@:3}")
        if [ ! -f result/digits_columnfc/victim_model/complete.json ]; then
            python pretrain_modi.py "${2:--1}" ./config/digits.json
        fi
        run_baselines "${2:--1}" ./config/digits.json iter_prunetxt
        ;;
    *)
        usage
        ;;
esac
