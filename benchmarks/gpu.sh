#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, in parts that each fit one 10-minute device call:
#   bash benchmarks/gpu.sh speed   # train_speed.py: Llama-8B shape, bf16, 2 × 2048 tokens (then Llama-1B)
#   bash benchmarks/gpu.sh svd     # svd_init.py: all-linear SVD of the 8B shape, randomized vs exact
#   bash benchmarks/gpu.sh multi   # multi_adapter.py --mode gpu: 1/64/1000-adapter batches, loads, memory
# Needs torch, transformers, peft and accelerate (a device image has them); nora runs from src/ uninstalled.
# Logs and JSON go to $OUT (the device's return folder) or ./gpu-results.
set -euo pipefail
cd "$(dirname "$0")"
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/../src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "${1:-}" in
speed)
    python train_speed.py --shape llama-8b --dtype bf16 --batch 2 --seq 2048 --steps 5 --warmup 2 \
        --json "$out/train_speed_8b.json" 2>&1 | tee "$out/train_speed_8b.log"
    python train_speed.py --shape llama-1b --dtype bf16 --batch 4 --seq 2048 --steps 5 --warmup 2 \
        --json "$out/train_speed_1b.json" 2>&1 | tee "$out/train_speed_1b.log"
    ;;
svd)
    python svd_init.py --shape llama-8b --r 256 --dtype bf16 2>&1 | tee "$out/svd_init_8b.log"
    ;;
multi)
    python multi_adapter.py --mode gpu --reserve --json "$out/multi_adapter_8b.json" 2>&1 | tee "$out/multi_adapter_8b.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh speed|svd|multi" >&2
    exit 2
    ;;
esac
