"""SVD initialisation time for all linear layers, auto vs exact vs seeded randomized, and the randomized subspace
error.

    python benchmarks/svd_init.py --shape cpu-small
    python benchmarks/svd_init.py --shape llama-8b --r 256      # GPU: target ≤ 10 s randomized

    python benchmarks/svd_init.py --model ~/.cache/nora/SmolLM2-135M-Instruct --r 32   # real pretrained weights

    # NoRA r=128, inner_r=8, all-linear, idle and with a CPU hog on every core: the old default (randomized,
    # equal shapes stacked into one batched solve at torch's thread count) vs this version's solvers
    python benchmarks/svd_init.py --model ~/.cache/nora/SmolLM2-135M-Instruct --load-compare --r 128

Randomized vs exact, per matrix, worst over the matrices checked: the sine of the largest principal angle
between the top-r left singular subspaces (strict: near-equal σ_r, σ_r+1 make the last direction arbitrary for
any solver), the root-mean-square sine over the r angles, and the energy deficit 1 − ‖U_rndᵀW‖² / ‖U_exᵀW‖².
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from unittest import mock

import torch
from train_speed import SHAPES, build_model

import nora
import nora.model
from nora.basis import _target
from nora.svd import BASIS_CACHE, SVDSettings, _randomized, canonicalise_signs, check_finite, truncated_svd


def load_model(args, device: str, dtype: torch.dtype):
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    return build_model(args.shape, dtype, device)


def init_time(args, solver: str, device: str, dtype: torch.dtype) -> tuple[float, int]:
    model = load_model(args, device, dtype)
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
    model = load_model(args, device, dtype)
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


def legacy_compute_factors(requests, settings, cache_dir=None, desc=""):
    """compute_factors and truncated_svd as they were before the solve was pinned to one thread: equal shapes
    stacked into one batched solve (all 60 or 30 matrices of a shape here) at torch's thread count."""
    out, todo = {}, {}
    for req in requests:
        todo.setdefault((tuple(req.W.shape), req.r), []).append(req)
    for (shape, r), reqs in todo.items():
        for req in reqs:
            check_finite(req.W, req.where)
        W = torch.stack([_target(req, settings) for req in reqs])
        if settings.solver == "exact" or r + settings.oversample >= min(shape):
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
        else:
            U, S, Vh = _randomized(W, r, settings)
        U, Vh = canonicalise_signs(U, Vh)
        for j, req in enumerate(reqs):
            out[req.key] = {"U": U[j].contiguous(), "S": S[j].contiguous(), "Vh": Vh[j].contiguous()}
    return out


@contextlib.contextmanager
def cpu_hog(count: int):
    """`count` busy-looping processes, as other jobs on a shared machine would be (each also exits when this
    process dies, killed or not)."""
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        time.sleep(1.0)
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def load_compare(args) -> None:
    """get_peft_model(NoRA r, inner_r=8, all-linear) idle and under CPU hogs, old default vs this version."""
    hogs = args.hogs or os.cpu_count() or 1
    variants = {
        "old default (randomized, batched)": ("randomized", True),
        "randomized (now)": ("randomized", False),
        "auto (new default)": ("auto", False),
        "exact (now)": ("exact", False),
    }
    print(
        f"{args.model}: NoRA r={args.r}, inner_r=8, all-linear; torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
        f"hog = {hogs} spinning processes"
    )
    print("| load | solver | layers | seconds | vs old default |\n|---|---|---|---|---|")
    for load in args.loads.split(","):
        base = None
        for name, (solver, legacy) in variants.items():
            model = load_model(args, "cpu", torch.float32)
            BASIS_CACHE.clear()
            patch = mock.patch.object(nora.model, "compute_factors", legacy_compute_factors) if legacy else None
            with patch or contextlib.nullcontext(), cpu_hog(hogs) if load == "hog" else contextlib.nullcontext():
                start = time.perf_counter()
                cfg = nora.NoraConfig(r=args.r, inner_r=8, target_modules="all-linear", svd=solver)  # niter 8
                wrapped = nora.get_peft_model(model, cfg)
                seconds = time.perf_counter() - start
            base = base or seconds
            print(f"| {load} | {name} | {len(wrapped.layers())} | {seconds:.1f} | {base / seconds:.1f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="cpu-small")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--samples", type=int, default=8, help="matrices checked for the subspace error")
    ap.add_argument("--niter", type=int, default=4, help="power iterations of the randomized solver")
    ap.add_argument("--model", help="a local transformers causal-LM directory instead of --shape")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--load-compare", action="store_true", help="NoRA all-linear init, idle and hogged, old vs new")
    ap.add_argument("--loads", default="idle,hog", help="with --load-compare: idle, hog or both")
    ap.add_argument("--hogs", type=int, default=0, help="with --load-compare: spinning processes (default: 1 per CPU)")
    args = ap.parse_args()
    if args.load_compare:
        return load_compare(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model or args.shape}, r={args.r}, niter={args.niter}, {args.dtype} weights, {dev}")
    for solver in ("auto", "randomized", "exact"):
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
