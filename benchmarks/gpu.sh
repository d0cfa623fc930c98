#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, in parts that each fit one 10-minute device call:
#   bash benchmarks/gpu.sh speed   # train_speed.py: Llama-8B shape, bf16, 2 × 2048 tokens (then Llama-1B)
#   bash benchmarks/gpu.sh svd     # svd_init.py: all-linear SVD of the 8B shape, randomized vs exact
#   bash benchmarks/gpu.sh multi   # multi_adapter.py --mode gpu: 1/64/1000-adapter batches, loads, memory
#   bash benchmarks/gpu.sh fused   # the 8B step again, PEFT LoRA r=32 vs NoRA, with Liger's fused kernels
# Needs torch, transformers, peft and accelerate (a device image has them); nora runs from src/ uninstalled.
# Wheels in .whl/ (ignored; carry it: liger-kernel is pure Python) are installed to /tmp/site first.
# Logs and JSON go to $OUT (the device's return folder) or ./gpu-results.
set -euo pipefail
case "${1:-}" in
speed | svd | multi | fused) ;;
*) echo "usage: bash benchmarks/gpu.sh speed|svd|multi|fused" >&2 && exit 2 ;;
esac
cd "$(dirname "$0")"
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G "../.whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/../src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
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
fused)
    python train_speed.py --shape llama-8b --dtype bf16 --batch 2 --seq 2048 --steps 5 --warmup 2 --liger \
        --only peft-lora-r32 nora-nora-r256-i16 --json "$out/train_speed_8b_liger.json" 2>&1 |
        tee "$out/train_speed_8b_liger.log"
    ;;
multi)
    python multi_adapter.py --mode gpu --reserve --json "$out/multi_adapter_8b.json" 2>&1 | tee "$out/multi_adapter_8b.log"
    ;;
esac
