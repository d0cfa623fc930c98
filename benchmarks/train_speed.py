"""Training speed and memory, side by side in one process: PEFT LoRA vs nora's methods (and full fine-tuning).

    python benchmarks/train_speed.py --shape cpu-small            # anywhere, a few minutes on 2 cores
    python benchmarks/train_speed.py --shape llama-1b --dtype bf16 # GPU
    python benchmarks/train_speed.py --shape llama-8b --dtype bf16 --batch 2 --seq 2048

Random weights built from configs (no downloads). Every run: same model, data, batch, sequence length, AdamW.
Memory: on CUDA the peak allocated bytes; on CPU (where the allocator keeps no peak) the bytes autograd saves
for backward plus trainable parameters, their gradients and AdamW state, counted exactly through hooks.
--liger, --compile and --checkpointing apply nora.accel's options to every method alike (PEFT's too).

The FLOP floor of a step with a frozen base: twice the base model's forward FLOPs (every matmul again for its
input gradient, none for weight gradients), counted by torch's FlopCounterMode, over --peak-tflops.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch
from counting import SavedBytes
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora import accel

SHAPES = {
    "cpu-small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(  # SmolLM2-135M's architecture (210 linear layers)
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def build_model(shape: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in the target dtype: no float32 copy of an 8B model first
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)


def nora_method(config) -> Callable:
    return lambda m: nora.get_peft_model(m, config)


def peft_lora(r: int) -> Callable:
    def wrap(m):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))

    return wrap


def full_ft(m):
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def methods(shape: str) -> dict[str, Callable]:
    big = shape != "cpu-small"
    r_outer = 256 if big else 64
    table = {
        "peft-lora-r16": peft_lora(16),
        "peft-lora-r32": peft_lora(32),
        "nora-lora-r32": nora_method(nora.LoraConfig(r=32, alpha=64)),
        f"nora-nora-r{r_outer}-i16": nora_method(nora.NoraConfig(r=r_outer, inner_r=16, svd="randomized")),
        f"nora-lora-xs-r{r_outer // 2}": nora_method(nora.LoraXSConfig(r=r_outer // 2, svd="randomized")),
        f"nora-svfit-r{r_outer}": nora_method(nora.SVFitConfig(r=r_outer, svd="randomized")),
    }
    if shape != "llama-8b":
        table["full-ft"] = full_ft
    return table


def accelerate(model, args) -> tuple[torch.nn.Module, dict[str, str]]:
    report: dict[str, str] = {}
    if args.liger:
        report |= accel.enable_fused_kernels(model)
    if args.checkpointing:
        accel.enable_adapter_checkpointing(model)
        report["checkpointing"] = "adapter policy"
    if args.compile:
        model, report["compile"] = accel.compile_model(model)
    return model, report


@torch.no_grad()
def floor_flops(args, device: str, dtype: torch.dtype) -> int:
    """FLOPs of a frozen-base training step: forward, then each matmul again for its input gradient."""
    model = build_model(args.shape, dtype, device)
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    del model
    gc.collect()
    return 2 * counter.get_total_flops()


def run(name: str, wrap: Callable, args, device: str, dtype: torch.dtype) -> dict:
    model, report = accelerate(wrap(build_model(args.shape, dtype, device)), args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    times, saved = [], 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        start = time.perf_counter()
        counter = SavedBytes()
        with counter.hooks():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        saved = counter.total
    step_s = statistics.median(times)
    trainable = sum(p.numel() for p in params)
    state = sum(p.numel() * p.element_size() * 4 for p in params)  # weight + grad + 2 AdamW moments (fp32 here)
    result = {
        "method": name,
        "ms_per_step": 1000 * step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "trainable_params": trainable,
        "saved_for_backward_MiB": saved / 2**20,
        "memory_MiB": (torch.cuda.max_memory_allocated() if device == "cuda" else saved + state) / 2**20,
        "loss": loss.item(),
        "accelerations": report,
    }
    del model, opt, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="cpu-small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only these methods")
    ap.add_argument("--liger", action="store_true", help="Liger fused kernels (CUDA + liger-kernel)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--checkpointing", action="store_true", help="nora's adapter-keeping checkpoint policy")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: 989 on H100/H200, none on CPU)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    table = methods(args.shape)
    run("warm-up", next(iter(table.values())), args, device, dtype)  # first-use costs land on no method
    for name, wrap in table.items():
        if args.only and name not in args.only:
            continue
        results.append(run(name, wrap, args, device, dtype))
        print(json.dumps(results[-1]), flush=True)
    ref = next((r for r in results if r["method"] == "peft-lora-r32"), results[0])
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (989.0 if device == "cuda" and any(h in dev for h in ("H100", "H200")) else None)
    flops = floor_flops(args, device, dtype)
    floor = f"{flops / 1e9:,.1f} GFLOP per step"
    if peak:
        floor_ms = 1000 * flops / (peak * 1e12)
        floor += f", {floor_ms:.1f} ms at {peak:g} TFLOP/s"
        for r in results:
            r["floor_fraction"] = floor_ms / r["ms_per_step"]
    accels = {k: v for r in results for k, v in r["accelerations"].items()}
    print(f"\n{args.shape}, {args.dtype}, batch {args.batch} × {args.seq} tokens, AdamW, {dev}")
    print(f"frozen-base FLOP floor: {floor}; accelerations: {accels or 'none'}\n")
    print(
        "| method | ms/step | tokens/s | × PEFT LoRA r32 speed | memory MiB | × PEFT LoRA r32 memory "
        "| saved for backward MiB | trainable params |" + (" of FLOP floor |" if peak else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if peak else ""))
    for r in results:
        print(
            f"| {r['method']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {r['memory_MiB']:.1f} "
            f"| {r['memory_MiB'] / ref['memory_MiB']:.2f} | {r['saved_for_backward_MiB']:.1f} "
            f"| {r['trainable_params']:,} |" + (f" {100 * r['floor_fraction']:.0f} % |" if peak else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": dev, "floor_flops": flops, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
