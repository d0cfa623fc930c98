"""Many adapters on one base model: mixed-batch forward speed, adapter load time, memory per resident adapter.

    python benchmarks/multi_adapter.py --mode cpu   # cpu-small shape, fp32, 64 rows × 32 tokens: minutes on 2 cores
    python benchmarks/multi_adapter.py --mode gpu   # Llama-3-8B shape, bf16, 64 rows × 128 tokens (CUDA)

Random weights built from configs (no downloads); one base model serves every part, side by side in one process:

1. Forward of a batch whose rows use 1, 64 or 1000 distinct adapters: the base model alone, PEFT LoRA with
   `adapter_names=` (up to --peft-max adapters: PEFT adds adapters in time growing with the number it holds),
   and nora NoRA with `adapter_names=` over resident adapters loaded from files. A batch with more distinct
   adapters than --rows has one row per adapter; every column is timed on the same batch. Only the last
   position's logits are computed (`logits_to_keep=1`, as in serving), so the vocabulary projection of 1000 rows
   × 128 tokens does not dominate or exhaust memory.
2. Load time of one saved NoRA adapter (`load_adapter`) with 1, 1000 and 10,000 adapters resident: median and
   p95 over --loads loads, each timed load deleted again so that every one sees the same count; also the time to
   load all of them one by one (stacks grow by doubling on the way, unless --reserve allocates them up front).
3. Memory per resident adapter: the bytes of its slot, and the measured growth of process RSS (CPU) or CUDA
   memory from 1000 to the final count; and the number of adapters resident at the end (--max-resident).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_speed import SHAPES
from train_speed import build_model as build_train_model

import nora

MODES = {
    "cpu": dict(shape="cpu-small", dtype="fp32", rows=64, seq=32, repeats=5),
    "gpu": dict(shape="llama-8b", dtype="bf16", rows=64, seq=128, repeats=5),
}


def build_model(shape: str, dtype: torch.dtype, device: str):
    """Random weights from the shape's config (seeded: every copy is the same model), in eval mode."""
    return build_train_model(shape, dtype, device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_together(fns: dict, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds (one call of each per round), after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_now(device: str) -> int | None:
    """CUDA memory allocated, or the process's resident set (after handing freed heap pages back, on glibc)."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def nora_config(args) -> nora.NoraConfig:
    return nora.NoraConfig(r=args.r, inner_r=args.inner_r, svd="randomized")


@torch.no_grad()
def save_distinct_adapters(base, args, n: int, root: Path) -> list[Path]:
    """`n` distinct NoRA adapters of `base` (every inner tensor random), saved as root/a{i}; `base` unchanged."""
    model = nora.get_peft_model(base, nora_config(args))
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        for p in params:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    model.unload()
    return paths


def peft_lora(base, args, n: int):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=args.peft_r, lora_alpha=2 * args.peft_r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", LoraConfig(**cfg))
    return model.eval()


def lora_bytes(peft_model) -> int:
    """Bytes of one PEFT adapter's tensors."""
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if ".a0." in n)


def batch_for(n: int, args, vocab: int, device: str) -> tuple[torch.Tensor, list[str]]:
    rows = max(args.rows, n)
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, vocab, (rows, args.seq), generator=g).to(device)
    return ids, [f"a{i % n}" for i in range(rows)]


def mixed(model, ids: torch.Tensor, names: list[str] | None):
    """One forward of the batch, each row under its own adapter (`names` None: the plain base model)."""
    if names is None:
        return lambda: model(input_ids=ids, logits_to_keep=1)
    return lambda: model(input_ids=ids, adapter_names=names, logits_to_keep=1)


def load_one(model, path: Path, name: str, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    model.load_adapter(path, name)
    sync(device)
    return time.perf_counter() - start


def fill_to(model, count: int, paths: list[Path], device: str, times: list[float]) -> None:
    """Load adapters a{k}… (cycling over the saved files) until `count` are resident."""
    while len(model.peft_config) - 1 < count:  # minus the entry adapter
        k = len(model.peft_config) - 1
        times.append(load_one(model, paths[k % len(paths)], f"a{k}", device))


def load_stats(model, paths: list[Path], device: str, loads: int) -> tuple[float, float]:
    """Median and p95 ms of `loads` loads at the current resident count (each deleted after it is timed)."""
    times = []
    for j in range(loads):
        times.append(load_one(model, paths[j % len(paths)], "probe", device))
        model.delete_adapter("probe")
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]


def forward_times(systems: dict, batches: dict, counts: list[int], args, device: str, forward: dict) -> None:
    """Time each system's forward of each batch; systems given together are timed in alternation, round after
    round, so that a machine busy with other work slows them alike."""
    for n in counts:
        fns = {}
        for name, model in systems.items():
            if name == "peft" and n > args.peft_max:
                continue
            ids, names = batches[n]
            fns[name] = mixed(model, ids, None if name == "base" else names)
        forward[n].update(timed_together(fns, device, args.repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=list(MODES), default="cpu")
    ap.add_argument("--shape", choices=list(SHAPES), help="override the mode's model shape")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="override the mode's dtype")
    ap.add_argument("--rows", type=int, help="batch rows (override)")
    ap.add_argument("--seq", type=int, help="tokens per row (override)")
    ap.add_argument("--repeats", type=int, help="timed forwards per cell (override)")
    ap.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        help="three copies of the base model, timed in alternation (default on CPU; GPU memory holds one)",
    )
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 64, 1000], help="distinct adapters per batch")
    ap.add_argument("--resident", type=int, nargs="+", default=[1, 1000, 10000], help="counts to time loads at")
    ap.add_argument("--max-resident", type=int, default=10000, help="load adapters until this many are resident")
    ap.add_argument("--loads", type=int, default=200, help="timed loads per resident count")
    ap.add_argument(
        "--reserve", action="store_true", help="reserve_resident(max-resident + 1) first: no load grows the stores"
    )
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--inner-r", type=int, default=8)
    ap.add_argument("--peft-r", type=int, default=16)
    ap.add_argument("--peft-max", type=int, default=64, help="most adapters given to PEFT")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_resident < max(args.adapters):
        ap.error("--max-resident must cover the largest --adapters count (those adapters must be resident)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode == "gpu" and device != "cuda":
        ap.error("--mode gpu needs CUDA; use --mode cpu here")
    if args.interleave is None:
        args.interleave = device == "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    vocab = SHAPES[args.shape]["vocab_size"]
    counts = sorted(set(args.adapters))
    resident = sorted({c for c in args.resident if c <= args.max_resident} | {args.max_resident})
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.shape}, {args.dtype}, {dev}; nora NoRA r={args.r} r'={args.inner_r}, PEFT LoRA r={args.peft_r}")
    peft_counts = [n for n in counts if n <= args.peft_max]

    base = build_model(args.shape, dtype, device).eval()
    batches = {n: batch_for(n, args, vocab, device) for n in counts}
    forward: dict[int, dict] = {n: {"rows": batches[n][0].shape[0]} for n in counts}
    systems: dict = {"base": base}
    if not args.interleave:
        with torch.no_grad():
            forward_times(systems, batches, counts, args, device, forward)
        systems = {}

    pm = peft_bytes = None
    if peft_counts and args.interleave:
        pm = peft_lora(build_model(args.shape, dtype, device), args, max(peft_counts))
        peft_bytes = lora_bytes(pm)
        systems["peft"] = pm

    with tempfile.TemporaryDirectory(prefix="nora-multi-") as tmp, torch.no_grad():
        nbase = build_model(args.shape, dtype, device).eval() if args.interleave else base
        start = time.perf_counter()
        paths = save_distinct_adapters(nbase, args, max(counts), Path(tmp))
        print(f"saved {len(paths)} distinct adapters in {time.perf_counter() - start:.1f} s", flush=True)
        model = nora.AdaptedModel.from_pretrained(nbase, paths[0], "entry")  # a module adapter; the rest resident
        if args.reserve:
            model.reserve_resident(args.max_resident + 1)  # + the timed load at the largest count
        systems["nora"] = model
        bulk: list[float] = []
        batch_resident = 0
        loads: dict[int, tuple[float, float]] = {}
        memory: dict[int, int | None] = {}
        for count in resident:
            fill_to(model, count, paths, device, bulk)
            if count >= max(counts) and "nora" not in forward[counts[0]]:  # every batch's adapters are resident
                forward_times(systems, batches, counts, args, device, forward)
                batch_resident = count
            gc.collect()
            memory[count] = memory_now(device)
            loads[count] = load_stats(model, paths, device, args.loads)
            print(f"{count} resident: load median {loads[count][0]:.2f} ms, p95 {loads[count][1]:.2f} ms", flush=True)
        n64 = min(64, max(counts))
        again = {"nora": mixed(model, *batches[n64])}
        if args.interleave:
            again["base"] = mixed(base, batches[n64][0], None)
        at_max = timed_together(again, device, args.repeats)
        report = model.memory_report()
        bank = next(iter(model.resident.banks.values()))
        reached, slot_bytes = report["resident_adapters"], bank.slot_bytes
        model.unload()
        del model, bank, systems
        gc.collect()

    if peft_counts and not args.interleave:
        pm = peft_lora(base, args, max(peft_counts))
        peft_bytes = lora_bytes(pm)
        with torch.no_grad():
            forward_times({"peft": pm}, batches, peft_counts, args, device, forward)
    del pm

    print(f"\n## Mixed batches ({args.rows} rows × {args.seq} tokens, or one row per adapter beyond that)\n")
    print("| distinct adapters in the batch | rows | base ms | PEFT `adapter_names` ms (× base) | nora ms (× base) |")
    print("|---|---|---|---|---|")
    for n in counts:
        f = forward[n]
        peft = f"{1000 * f['peft']:.1f} ({f['peft'] / f['base']:.2f}×)" if "peft" in f else "not run (--peft-max)"
        print(
            f"| {n} | {f['rows']} | {1000 * f['base']:.1f} | {peft} | "
            f"{1000 * f['nora']:.1f} ({f['nora'] / f['base']:.2f}×) |"
        )
    line = f"\nThe {n64}-adapter batch again with {reached:,} adapters resident: nora {1000 * at_max['nora']:.1f} ms"
    if "base" in at_max:
        line += f", base {1000 * at_max['base']:.1f} ms ({at_max['nora'] / at_max['base']:.2f}×)"
    print(line + f" (with {batch_resident:,} resident: {forward[n64]['nora'] / forward[n64]['base']:.2f}× base).")

    print("\n## Loading one adapter (`load_adapter`, NoRA, from a saved directory)\n")
    print("| adapters resident | loads timed | median ms | p95 ms |")
    print("|---|---|---|---|")
    for count, (median, p95) in loads.items():
        print(f"| {count:,} | {args.loads} | {median:.2f} | {p95:.2f} |")
    first, rest = bulk[0], bulk[1:] or [float("nan")]
    print(
        f"\nLoading {len(bulk):,} adapters one after another: {sum(bulk):.1f} s in all. The first (it makes the bank: "
        f"full checks, bases taken from the layers or the basis cache) {1000 * first:.1f} ms; the others median "
        f"{1000 * statistics.median(rest):.2f} ms, slowest {1000 * max(rest):.1f} ms "
        + (
            "(slots reserved up front: no load grew the stores)."
            if args.reserve
            else "(stacks double when full, and that load copies every adapter already resident)."
        )
    )

    print("\n## Memory\n")
    lo, hi = min(c for c in memory if c >= max(counts)), reached
    grown = None
    if memory[lo] is not None and memory.get(hi) is not None and hi > lo:
        grown = (memory[hi] - memory[lo]) / (hi - lo)
    what = "CUDA memory allocated" if device == "cuda" else "process RSS"
    print(f"- adapters resident at the end: {reached:,}")
    print(f"- one resident adapter's slot: {slot_bytes:,} bytes ({slot_bytes / 1024:.1f} KiB, every layer)")
    if grown is not None:
        print(f"- measured growth of {what} from {lo:,} to {hi:,} resident: {grown / 1024:.1f} KiB per adapter")
    print(f"- allocated for resident adapters (spare slots included): {report['resident'] / 2**20:.1f} MiB")
    if peft_bytes is not None:
        print(f"- one PEFT LoRA r={args.peft_r} adapter's tensors: {peft_bytes:,} bytes ({peft_bytes / 1024:.1f} KiB)")

    if args.json:
        results = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "device": dev,
            "forward_s": forward,
            "loads_ms": {c: {"median": m, "p95": p} for c, (m, p) in loads.items()},
            "bulk_load_s": sum(bulk),
            "resident_reached": reached,
            "slot_bytes": slot_bytes,
            "measured_bytes_per_adapter": grown,
            "peft_adapter_bytes": peft_bytes,
            "batch64_at_max_resident_s": at_max,
        }
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
