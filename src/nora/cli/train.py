"""`nora train`: fine-tune an adapter from the command line; every option can also come from a YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import AdapterError
from . import app

Opt = typer.Option


def _adapter_options(pairs: list[str] | None) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--adapter-option {pair!r}: write KEY=VALUE, e.g. --adapter-option inner=out.")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def build_config(config_file: Path | None, cli: dict[str, Any]):
    """TrainConfig from defaults, then the YAML file, then the options given on the command line."""
    from ..training import TrainConfig, load_yaml

    values = load_yaml(config_file) if config_file else {}
    adapter = values.pop("adapter", None) or {}
    if not isinstance(adapter, dict):
        raise AdapterError(f"option adapter={adapter!r} must be dict: the adapter's fields, e.g. adapter: {{r: 8}}.")
    adapter = dict(adapter)
    for key in ("rank", "alpha", "inner_rank", "dropout"):
        if key in values:  # flat YAML spellings of the adapter shortcuts
            adapter[{"rank": "r", "inner_rank": "inner_r"}.get(key, key)] = values.pop(key)
    for key, field in (("rank", "r"), ("alpha", "alpha"), ("inner_rank", "inner_r"), ("dropout", "dropout")):
        if cli.get(key) is not None:
            adapter[field] = cli[key]
    adapter.update(_adapter_options(cli.pop("adapter_option", None)))
    for key in ("rank", "alpha", "inner_rank", "dropout"):
        cli.pop(key, None)
    values.update({k: v for k, v in cli.items() if v is not None})
    if isinstance(values.get("target_modules"), list) and len(values["target_modules"]) == 1:
        values["target_modules"] = values["target_modules"][0]
    if isinstance(values.get("labels"), str):
        values["labels"] = [s.strip() for s in values["labels"].split(",")]
    if isinstance(values.get("eval_tasks"), str):
        values["eval_tasks"] = [s.strip() for s in values["eval_tasks"].split(",")]
    values["adapter"] = adapter
    return TrainConfig.from_dict(values)


@app.command("train")
def train_command(
    config: Annotated[Path | None, Opt(help="YAML file of options (keys as below, e.g. learning_rate: 1e-3).")] = None,
    model: Annotated[str | None, Opt(help="Base model: a Hugging Face hub id or a local directory.")] = None,
    task: Annotated[str | None, Opt(help="causal-lm (default) or seq-cls.")] = None,
    data: Annotated[
        str | None, Opt(help="Training data: .json/.jsonl/.csv/.tsv/.txt, a directory, a hub name.")
    ] = None,
    eval_data: Annotated[str | None, Opt(help="Evaluation data, same formats.")] = None,
    eval_fraction: Annotated[float | None, Opt(help="Hold out this fraction of --data for evaluation.")] = None,
    output_dir: Annotated[str | None, Opt("--output-dir", "-o", help="Run directory (default runs/nora).")] = None,
    method: Annotated[str | None, Opt(help="nora (default), svfit, lora, pissa, lora-xs or dora.")] = None,
    rank: Annotated[float | None, Opt(help="Adapter (NoRA: outer) rank r; a value < 1 is a fraction.")] = None,
    inner_rank: Annotated[int | None, Opt(help="NoRA's inner rank r'.")] = None,
    alpha: Annotated[float | None, Opt(help="Scale numerator: the update is scaled by alpha/r.")] = None,
    dropout: Annotated[float | None, Opt(help="Adapter input dropout.")] = None,
    adapter_option: Annotated[list[str] | None, Opt(help="Any other adapter field, KEY=VALUE; repeat.")] = None,
    target_modules: Annotated[list[str] | None, Opt(help="Module names/regex to adapt (default all-linear).")] = None,
    gguf_file: Annotated[str | None, Opt(help="Load this GGUF file from the --model directory.")] = None,
    max_length: Annotated[int | None, Opt(help="Longest sequence in tokens; longer ones are truncated.")] = None,
    mask_prompt: Annotated[bool | None, Opt(help="Loss on the response tokens only (instruction data).")] = None,
    text_column: Annotated[str | None, Opt(help="Column holding the text.")] = None,
    text_pair_column: Annotated[str | None, Opt(help="Column holding the second sentence of a pair.")] = None,
    label_column: Annotated[
        str | None, Opt(help="Column holding the class label (seq-cls; default label, or GLUE's own).")
    ] = None,
    labels: Annotated[str | None, Opt(help="Comma-separated label set, in id order (seq-cls).")] = None,
    max_examples: Annotated[int | None, Opt(help="Use only the first N examples of --data.")] = None,
    batch_size: Annotated[int | None, Opt(help="Examples per device per micro-batch.")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches accumulated per optimizer step.")] = None,
    learning_rate: Annotated[float | None, Opt("--learning-rate", "--lr", help="Peak LR (default per method).")] = None,
    lr_scheduler: Annotated[str | None, Opt(help="linear, cosine, constant or constant_with_warmup.")] = None,
    warmup_ratio: Annotated[float | None, Opt(help="Warmup as a fraction of all steps.")] = None,
    warmup_steps: Annotated[int | None, Opt(help="Warmup steps (overrides --warmup-ratio).")] = None,
    epochs: Annotated[float | None, Opt(help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[int | None, Opt(help="Optimizer steps; overrides --epochs.")] = None,
    weight_decay: Annotated[float | None, Opt(help="AdamW weight decay.")] = None,
    max_grad_norm: Annotated[float | None, Opt(help="Gradient clipping norm (0: off).")] = None,
    seed: Annotated[int | None, Opt(help="Seed for adapter init and data order.")] = None,
    precision: Annotated[str | None, Opt(help="fp32, bf16 or fp16 (mixed precision).")] = None,
    gradient_checkpointing: Annotated[
        bool | None, Opt(help="Recompute the base model's activations in backward; keep the adapters' narrow ones.")
    ] = None,
    liger: Annotated[bool | None, Opt(help="Liger's fused kernels (CUDA; falls back, saying why).")] = None,
    compile: Annotated[bool | None, Opt(help="torch.compile the model (CUDA; falls back, saying why).")] = None,
    fsdp: Annotated[bool | None, Opt(help="Shard the model over the processes (FSDP2) instead of DDP.")] = None,
    logging_steps: Annotated[int | None, Opt(help="Log loss, LR and tokens/s every N steps.")] = None,
    eval_steps: Annotated[int | None, Opt(help="Evaluate every N steps (and always at the end).")] = None,
    save_steps: Annotated[int | None, Opt(help="Write a checkpoint every N steps.")] = None,
    save_total_limit: Annotated[int | None, Opt(help="Keep the newest K checkpoints.")] = None,
    resume: Annotated[str | None, Opt(help="'latest' or a checkpoint directory to continue from.")] = None,
    overwrite: Annotated[bool | None, Opt(help="Start over in an output dir that holds a run.")] = None,
    plot: Annotated[bool | None, Opt(help="Write curves.png at the end.")] = None,
    progress: Annotated[bool | None, Opt(help="Show a progress bar.")] = None,
    eval_tasks: Annotated[str | None, Opt(help="After training, evaluate these tasks (see `nora eval`).")] = None,
    eval_data_dir: Annotated[str | None, Opt(help="Where --eval-tasks finds its data.")] = None,
    eval_limit: Annotated[int | None, Opt(help="At most N items per --eval-tasks task.")] = None,
    threads: Annotated[
        int | None, Opt(min=1, help="CPU threads for torch (default: torch's choice; 1 on a busy machine).")
    ] = None,
) -> None:
    """Fine-tune an adapter on a causal LM (instruction or plain text) or a sequence classifier."""
    cli = dict(locals())
    config_file = cli.pop("config")
    threads = cli.pop("threads")
    if cli["rank"] is not None and float(cli["rank"]).is_integer():
        cli["rank"] = int(cli["rank"])  # --rank 8 is a rank; --rank 0.25 a fraction
    if cli["max_grad_norm"] == 0:
        cli["max_grad_norm"] = None
    from rich.console import Console

    from ..training import train

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        train_config = build_config(config_file, cli)
        result = train(train_config)
    except AdapterError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # disk full, permissions: the message is enough, a traceback is noise
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; continue from the last checkpoint with --resume latest.") from None
    print_summary(Console(), result.summary, result.adapter_dir)


def print_summary(console, summary: dict[str, Any], adapter_dir: Path) -> None:
    from rich.table import Table

    if not summary:
        return
    table = Table(title="training summary", show_header=False)
    rows = [
        ("method", summary["method"]),
        ("steps", f"{summary['steps']} (global batch {summary['global_batch']}, {summary['processes']} process(es))"),
        ("trainable params", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.3f} %)"),
        ("loss", f"{summary['first_loss']:.4f} → {summary['final_loss']:.4f}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s)"),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB"),
        ("adapter", f"{adapter_dir} ({summary['adapter_bytes'] / 2**10:,.1f} KiB)"),
        ("truncated / dropped", f"{summary['truncated']} / {summary['dropped']} examples"),
    ]
    for key, value in summary.items():
        if key.startswith("eval_") and isinstance(value, float):
            before = summary.get(f"initial_{key}")
            rows.append((key, f"{before:.4f} → {value:.4f}" if before is not None else f"{value:.4f}"))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
