"""SVD initialisation time for all linear layers, exact vs seeded randomized, and the randomized subspace error.

    python benchmarks/svd_init.py --shape cpu-small
    python benchmarks/svd_init.py --shape llama-8b --r 256      # GPU: target ≤ 10 s randomized

Principal-angle error: the sine of the largest principal angle between the randomized and the exact top-r
left singular subspaces, per matrix (max over all matrices reported), on the same random-weight model.
"""

from __future__ import annotations

import argparse
import time

import torch
from train_speed import SHAPES, build_model

import nora
from nora.svd import BASIS_CACHE, SVDSettings, truncated_svd


def init_time(shape: str, r: int, solver: str, device: str, dtype: torch.dtype) -> tuple[float, int]:
    model = build_model(shape, dtype, device)
    BASIS_CACHE.clear()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    wrapped = nora.get_peft_model(model, nora.NoraConfig(r=r, inner_r=16, svd=solver))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(wrapped.layers())


def subspace_error(shape: str, r: int, device: str, dtype: torch.dtype, samples: int) -> float:
    model = build_model(shape, dtype, device)
    worst = 0.0
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    for module in linears[:samples]:
        W = module.weight.detach()
        U, _, _ = truncated_svd(W, r, SVDSettings("randomized"))
        Ue, _, _ = truncated_svd(W, r, SVDSettings("exact"))
        cos = torch.linalg.svdvals(U.T @ Ue).min().clamp(max=1.0)
        worst = max(worst, float(torch.sqrt(1 - cos**2)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="cpu-small")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--samples", type=int, default=8, help="matrices checked for the subspace error")
    ap.add_argument("--skip-exact", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.shape}, r={args.r}, {args.dtype} weights, {dev}")
    for solver in ("randomized", "exact"):
        if solver == "exact" and args.skip_exact:
            continue
        seconds, n = init_time(args.shape, args.r, solver, device, dtype)
        print(f"| {solver} | {n} layers | {seconds:.2f} s |")
    print(
        f"max principal-angle sine, randomized vs exact ({args.samples} matrices): "
        f"{subspace_error(args.shape, args.r, device, dtype, args.samples):.2e}"
    )


if __name__ == "__main__":
    main()
