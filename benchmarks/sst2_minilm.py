"""all-MiniLM-L6-v2 on GLUE SST-2 with nora's training defaults: does NoRA train stably where a plain nested SVD
adapter diverged (outer r=384 or lr 2e-2)? Same steps, data and seed for every row.

    python benchmarks/sst2_minilm.py --steps 300 --out /tmp/sst2     # CPU, offline; ../shared/data must exist

Prints dev accuracy (872 sentences) per configuration and writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nora.demo import minilm_dir
from nora.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "nora (defaults: r=128, r'=8, lr 2e-3)": dict(method="nora"),
    "nora r=384 (full rank)": dict(method="nora", adapter={"r": 384, "inner_r": 8}),
    "nora lr 2e-2": dict(method="nora", learning_rate=2e-2),
    "lora r=8 (lr 5e-4)": dict(method="lora", adapter={"r": 8, "alpha": 16}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/nora-sst2"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sst2 = args.data_dir / "glue" / "SST-2"
    results = {}
    for i, (name, overrides) in enumerate(RUNS.items()):
        config = TrainConfig(
            model=str(minilm_dir()), task="seq-cls", data=str(sst2 / "train.tsv"), eval_data=str(sst2 / "dev.tsv"),
            max_examples=args.train_examples, output_dir=str(args.out / f"run{i}"), batch_size=args.batch_size,
            max_steps=args.steps, max_length=64, warmup_ratio=0.1, logging_steps=20, overwrite=True, plot=False,
            progress=False, **overrides,
        )  # fmt: skip
        s = train(config).summary
        results[name] = {k: s[k] for k in ("eval_acc", "initial_eval_acc", "first_loss", "final_loss",
                                           "trainable_params", "wall_time_s")}  # fmt: skip
        print(f"{name:40s} dev acc {100 * s['eval_acc']:.1f} %  loss {s['first_loss']:.3f} → {s['final_loss']:.3f}  "
              f"trainable {s['trainable_params']:,}  {s['wall_time_s']:.0f} s", flush=True)  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
