"""SVD initialisation time for all linear layers, exact vs seeded randomized, and the randomized subspace error.

    python benchmarks/svd_init.py --shape cpu-small
    python benchmarks/svd_init.py --shape llama-8b --r 256      # GPU: target ≤ 10 s randomized

    python benchmarks/svd_init.py --model ~/.cache/nora/SmolLM2-135M-Instruct --r 32   # real pretrained weights

Randomized vs exact, per matrix, worst over the matrices checked: the sine of the largest principal angle
between the top-r left singular subspaces (strict: near-equal σ_r, σ_r+1 make the last direction arbitrary for
any solver), the root-mean-square sine over the r angles, and the energy deficit 1 − ‖U_rndᵀW‖² / ‖U_exᵀW‖².
"""

from __future__ import annotations

import argparse
import time

import torch
from train_speed import SHAPES, build_model

import nora
from nora.svd import BASIS_CACHE, SVDSettings, truncated_svd


def load(args, device: str, dtype: torch.dtype):
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    return build_model(args.shape, dtype, device)


def init_time(args, solver: str, device: str, dtype: torch.dtype) -> tuple[float, int]:
    model = load(args, device, dtype)
    r = args.r
    BASIS_CACHE.clear()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    wrapped = nora.get_peft_model(model, nora.NoraConfig(r=r, inner_r=16, svd=solver, niter=args.niter))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(wrapped.layers())


def subspace_errors(args, device: str, dtype: torch.dtype) -> tuple[float, float, float]:
    model = load(args, device, dtype)
    worst_max = worst_rms = worst_energy = 0.0
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    for module in linears[: args.samples]:
        W = module.weight.detach().float()
        U, _, _ = truncated_svd(W, args.r, SVDSettings("randomized", niter=args.niter))
        Ue, _, _ = truncated_svd(W, args.r, SVDSettings("exact"))
        cos = torch.linalg.svdvals(U.T @ Ue).clamp(max=1.0)
        sines = torch.sqrt(1 - cos**2)
        worst_max = max(worst_max, float(sines.max()))
        worst_rms = max(worst_rms, float(sines.square().mean().sqrt()))
        worst_energy = max(worst_energy, float(1 - (U.T @ W).square().sum() / (Ue.T @ W).square().sum()))
    return worst_max, worst_rms, worst_energy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="cpu-small")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--samples", type=int, default=8, help="matrices checked for the subspace error")
    ap.add_argument("--niter", type=int, default=4, help="power iterations of the randomized solver")
    ap.add_argument("--model", help="a local transformers causal-LM directory instead of --shape")
    ap.add_argument("--skip-exact", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model or args.shape}, r={args.r}, niter={args.niter}, {args.dtype} weights, {dev}")
    for solver in ("randomized", "exact"):
        if solver == "exact" and args.skip_exact:
            continue
        seconds, n = init_time(args, solver, device, dtype)
        print(f"| {solver} | {n} layers | {seconds:.2f} s |")
    worst_max, worst_rms, worst_energy = subspace_errors(args, device, dtype)
    print(
        f"randomized vs exact, worst of {args.samples} matrices: max principal-angle sine {worst_max:.2e}, "
        f"rms sine {worst_rms:.2e}, energy deficit {worst_energy:.2e}"
    )


if __name__ == "__main__":
    main()
