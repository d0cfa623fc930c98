"""Forward over a batch mixing many distinct adapters: base model vs PEFT `adapter_names=` vs nora's shared basis.

    python benchmarks/multi_adapter.py --shape cpu-small --adapters 1 64 1000 --peft-max 64
    python benchmarks/multi_adapter.py --shape llama-8b --dtype bf16 --rows 64 --seq 128 --adapters 1 64 1000

Random weights from configs; every adapter is distinct (randomly perturbed). Also reports the time to add one
adapter to a model that already holds the others, and the memory each resident adapter costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from train_speed import SHAPES, build_model

import nora


def timed(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nora_model(args, device, dtype, n: int):
    model = nora.get_peft_model(
        build_model(args.shape, dtype, device),
        nora.NoraConfig(r=args.r, inner_r=args.inner_r, svd="randomized"),
        adapter_name="a0",
    )
    add_times = []
    for i in range(1, n):
        start = time.perf_counter()
        model.add_adapter(f"a{i}", nora.NoraConfig(r=args.r, inner_r=args.inner_r, svd="randomized"))
        add_times.append(time.perf_counter() - start)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers().values():
            for core in layer.adapters.values():
                for p in core.params.values():
                    p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    model.eval_mode_frozen()
    return model, (statistics.median(add_times) if add_times else float("nan"))


def peft_model(args, device, dtype, n: int):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=args.peft_r, lora_alpha=2 * args.peft_r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(build_model(args.shape, dtype, device), LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", LoraConfig(**cfg))
    model.eval()
    return model


def base_time(args, device: str, dtype: torch.dtype, ids: torch.Tensor) -> float:
    base = build_model(args.shape, dtype, device).eval()
    return timed(lambda: base(input_ids=ids), device, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="cpu-small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 64, 1000])
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--inner-r", type=int, default=8)
    ap.add_argument("--peft-r", type=int, default=16)
    ap.add_argument("--peft-max", type=int, default=64, help="largest adapter count tried with PEFT")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.shape}, {args.dtype}, forward of {args.rows} rows × {args.seq} tokens, {dev}")
    print(f"nora NoRA r={args.r} r'={args.inner_r}; PEFT LoRA r={args.peft_r}\n")

    with torch.no_grad():
        ids = torch.randint(0, vocab, (args.rows, args.seq), generator=g).to(device)
        t_base = base_time(args, device, dtype, ids)
        print(
            "| adapters in the batch | base ms | PEFT adapter_names ms (× base) | nora mixed ms (× base) "
            "| nora add-one-adapter ms | nora bytes per adapter |"
        )
        print("|---|---|---|---|---|---|")
        for n in args.adapters:
            rows = [f"a{i % n}" for i in range(args.rows)] if n <= args.rows else [f"a{i}" for i in range(n)]
            batch_ids = (
                ids if len(rows) == args.rows else torch.randint(0, vocab, (n, args.seq), generator=g).to(device)
            )
            scale = len(rows) / args.rows  # time per row of the base batch, for batches larger than --rows
            model, add_s = nora_model(args, device, dtype, n)
            t_nora = timed(lambda m=model, r=rows, b=batch_ids: m(input_ids=b, adapter_names=r), device, args.repeats)
            mem = model.memory_report()
            per_adapter = (mem["adapter_tensors"] + mem["stacks"]) / n
            del model
            peft_cell = "–"
            if n <= args.peft_max:
                pm = peft_model(args, device, dtype, n)
                t_peft = timed(lambda m=pm, r=rows, b=batch_ids: m(input_ids=b, adapter_names=r), device, args.repeats)
                peft_cell = f"{1000 * t_peft:.1f} ({t_peft / (t_base * scale):.2f}×)"
                del pm
            print(
                f"| {n} | {1000 * t_base * scale:.1f} | {peft_cell} | {1000 * t_nora:.1f} "
                f"({t_nora / (t_base * scale):.2f}×) | {1000 * add_s:.1f} | {per_adapter:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
