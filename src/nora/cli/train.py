"""`nora train`: fine-tune an adapter from the command line; every option is also a key of the YAML file.

OPTIONS is the command: each row declares one option (its type, flags and help) and what it sets, a TrainConfig
field or a field of the method's adapter config ("adapter.r"). `nora train`'s signature is built from it, and
build_config follows it from the command line's values to the TrainConfig.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import AdapterError
from ..methods import METHODS
from ..tasks import TASKS, OptionRow
from ..training.config import TrainConfig, closest, load_yaml
from . import app

Opt = typer.Option


def _same(value: Any) -> Any:
    return value


def _rank(value: Any) -> Any:
    whole = isinstance(value, float) and value.is_integer()
    return int(value) if whole else value  # --rank 8 is a rank; --rank 0.25 a fraction (others: checked later)


def _zero_is_off(value: float) -> float | None:
    return None if value == 0 else value


def _adapter_options(pairs: list[str] | str) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in [pairs] if isinstance(pairs, str) else pairs:
        key, sep, value = pair.partition("=") if isinstance(pair, str) else ("", "", "")
        if not sep or not key.strip():
            raise AdapterError(
                f"--adapter-option {pair!r}: write KEY=VALUE, e.g. --adapter-option inner=out (in YAML also "
                "adapter: {inner: out})."
            )
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


@dataclass(frozen=True)
class CliOption:
    """One option of `nora train`: its parameter name (the flag is --name-with-dashes unless `option` names
    others), its type (every option defaults to None: not given), and what it sets."""

    name: str
    type: Any
    sets: str | None  # a TrainConfig field; "adapter.FIELD" or "adapter" (KEY=VALUE pairs); None: the command's own
    option: Any  # typer.Option(...): the flags and help
    parse: Callable[[Any], Any] = _same  # the command line's value → the field's

    @property
    def annotation(self) -> Any:
        return Annotated[self.type | None, self.option]


def _choices(names: Iterable[str], default: str) -> str:
    """Help text listing `names`: "nora (default), lora, ... or svfit." """
    listed = [f"{default} (default)", *(name for name in names if name != default)]
    return (", ".join(listed[:-1]) + " or " if len(listed) > 1 else "") + f"{listed[-1]}."


_DEFAULT = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _kind_option(row: OptionRow) -> CliOption:
    return CliOption(row.name, row.type, row.name, Opt(*row.flags, help=row.help))


def _kind_rows() -> tuple[CliOption, ...]:
    """The options the task kinds declare (nora.tasks: each kind's `option_rows`), each once."""
    rows = {row.name: row for kind in TASKS.values() for row in kind.option_rows}
    return tuple(_kind_option(row) for row in rows.values())


OPTIONS: tuple[CliOption, ...] = (
    CliOption("config", Path, None, Opt(help="YAML file of options (keys as below, e.g. learning_rate: 1e-3).")),
    CliOption("model", str, "model", Opt(help="Base model: a Hugging Face hub id, a local directory or a .gguf file.")),
    CliOption("task", str, "task", Opt(help=_choices(TASKS, _DEFAULT["task"]))),
    CliOption("data", str, "data", Opt(help="Training data: .json/.jsonl/.csv/.tsv/.txt, a directory, a hub name.")),
    CliOption("eval_data", str, "eval_data", Opt(help="Evaluation data, same formats.")),
    CliOption("eval_fraction", float, "eval_fraction", Opt(help="Hold out this fraction of --data for evaluation.")),
    CliOption("output_dir", str, "output_dir", Opt("--output-dir", "-o", help="Run directory (default runs/nora).")),
    CliOption("method", str, "method", Opt(help=_choices(METHODS, _DEFAULT["method"]))),
    CliOption(
        "rank",
        float,
        "adapter.r",
        Opt(
            help="Adapter (NoRA: outer) rank r, exact; < 1: a fraction (default: per method, lowered on narrow layers)."
        ),
        _rank,
    ),
    CliOption("inner_rank", int, "adapter.inner_r", Opt(help="NoRA's inner rank r' (default r/4: 32 at r=128).")),
    CliOption("alpha", float, "adapter.alpha", Opt(help="Scale numerator: the update is scaled by alpha/r.")),
    CliOption("dropout", float, "adapter.dropout", Opt(help="Adapter input dropout.")),
    CliOption(
        "clamp_rank",
        bool,
        "adapter.clamp_rank",
        Opt(help="Lower a rank given (--rank, --inner-rank) on narrower layers; --no-clamp-rank: nor the default."),
    ),
    CliOption(
        "adapter_option",
        list[str],
        "adapter",
        Opt(help="Any other adapter field, KEY=VALUE; repeat."),
        _adapter_options,
    ),
    CliOption(
        "target_modules", list[str], "target_modules", Opt(help="Module names/regex to adapt (default all-linear).")
    ),
    CliOption(
        "target_parameters",
        list[str],
        "target_parameters",
        Opt(help="Fused MoE expert parameters to adapt: all-experts or names (default: all of them under all-linear)."),
    ),
    CliOption("gguf_file", str, "gguf_file", Opt(help="GGUF file in the --model folder (or its path as --model).")),
    CliOption("quantize", str, "quantize", Opt(help="Load the base quantized: nf4 or fp4 (4-bit, QLoRA) or int8.")),
    CliOption("loftq", bool, "loftq", Opt(help="With --quantize: start the adapter fitted to the quantization error.")),
    CliOption("max_length", int, "max_length", Opt(help="Longest sequence in tokens; longer ones are truncated.")),
    CliOption("mask_prompt", bool, "mask_prompt", Opt(help="Loss on the response tokens only (instruction data).")),
    CliOption("text_column", str, "text_column", Opt(help="Column holding the text.")),
    CliOption("text_pair_column", str, "text_pair_column", Opt(help="Column holding the second sentence of a pair.")),
    CliOption(
        "label_column",
        str,
        "label_column",
        Opt(help="Column holding the class label (seq-cls; default label, or GLUE's own)."),
    ),
    CliOption("labels", str, "labels", Opt(help="Comma-separated label set, in id order (seq-cls).")),
    CliOption("max_examples", int, "max_examples", Opt(help="Use only the first N examples of --data.")),
    *_kind_rows(),
    CliOption("batch_size", int, "batch_size", Opt(help="Examples per device per micro-batch.")),
    CliOption(
        "calibration_batches",
        int,
        "calibration_batches",
        Opt(help="AwSVD (--adapter awsvd=true): the first N training batches measure each layer's input scales."),
    ),  # fmt: skip
    CliOption(
        "group_by_length",
        bool,
        "group_by_length",
        Opt(help="Batch examples of similar length together (less padding; still shuffled each epoch)."),
    ),
    CliOption("grad_accum", int, "grad_accum", Opt(help="Micro-batches accumulated per optimizer step.")),
    CliOption(
        "learning_rate",
        float,
        "learning_rate",
        Opt("--learning-rate", "--lr", help="Peak LR (default per method)."),
    ),
    CliOption("lr_scheduler", str, "lr_scheduler", Opt(help="linear, cosine, constant or constant_with_warmup.")),
    CliOption("warmup_ratio", float, "warmup_ratio", Opt(help="Warmup as a fraction of all steps.")),
    CliOption("warmup_steps", int, "warmup_steps", Opt(help="Warmup steps (overrides --warmup-ratio).")),
    CliOption("epochs", float, "epochs", Opt(help="Passes over the data (default 1).")),
    CliOption("max_steps", int, "max_steps", Opt(help="Optimizer steps; overrides --epochs.")),
    CliOption("weight_decay", float, "weight_decay", Opt(help="AdamW weight decay.")),
    CliOption("max_grad_norm", float, "max_grad_norm", Opt(help="Gradient clipping norm (0: off)."), _zero_is_off),
    CliOption("seed", int, "seed", Opt(help="Seed for adapter init and data order.")),
    CliOption("precision", str, "precision", Opt(help="fp32, bf16 or fp16 (mixed precision).")),
    CliOption(
        "gradient_checkpointing",
        bool,
        "gradient_checkpointing",
        Opt(help="Recompute the base model's activations in backward; keep the adapters' narrow ones."),
    ),
    CliOption("liger", bool, "liger", Opt(help="Liger's fused kernels (CUDA; falls back, saying why).")),
    CliOption("compile", bool, "compile", Opt(help="torch.compile the model (CUDA; falls back, saying why).")),
    CliOption(
        "lean_activations",
        bool,
        "lean_activations",
        Opt(help="MLP and norms keep only what backward needs (exact; default on; --no-lean-activations: stock)."),
    ),
    CliOption(
        "loss_chunk_tokens",
        int,
        "loss_chunk_tokens",
        Opt(help="Causal LM: head and loss this many tokens at a time, never all logits (default auto; 0: stock)."),
    ),
    CliOption("fsdp", bool, "fsdp", Opt(help="Shard the model over the processes (FSDP2) instead of DDP.")),
    CliOption("logging_steps", int, "logging_steps", Opt(help="Log loss, LR and tokens/s every N steps.")),
    CliOption("eval_steps", int, "eval_steps", Opt(help="Evaluate every N steps (and always at the end).")),
    CliOption("save_steps", int, "save_steps", Opt(help="Write a checkpoint every N steps.")),
    CliOption("save_total_limit", int, "save_total_limit", Opt(help="Keep the newest K checkpoints.")),
    CliOption("resume", str, "resume", Opt(help="'latest' or a checkpoint directory to continue from.")),
    CliOption(
        "resume_changes",
        bool,
        "resume_changes",
        Opt(help="With --resume: continue with other data, model, adapter or batch settings (log.jsonl records them)."),
    ),
    CliOption(
        "overwrite",
        bool,
        "overwrite",
        Opt(help="Start over in an output dir that holds a run; it is replaced once the new run has its adapter."),
    ),
    CliOption("plot", bool, "plot", Opt(help="Write curves.png at the end.")),
    CliOption("progress", bool, "progress", Opt(help="Show a progress bar.")),
    CliOption("eval_tasks", str, "eval_tasks", Opt(help="After training, evaluate these tasks (see `nora eval`).")),
    CliOption("eval_data_dir", str, "eval_data_dir", Opt(help="Where --eval-tasks finds its data.")),
    CliOption("eval_limit", int, "eval_limit", Opt(help="At most N items per --eval-tasks task.")),
    CliOption("threads", int, "threads", Opt(min=1, help="CPU threads for torch (default: torch's choice).")),
)
_OPTION = {option.name: option for option in OPTIONS}


def _current_options() -> tuple[CliOption, ...]:
    """OPTIONS, and the rows of a task kind registered since the command was built (its options as YAML keys)."""
    return OPTIONS + tuple(row for row in _kind_rows() if row.name not in _OPTION)


def _listed(value: Any) -> Any:
    return [s.strip() for s in value.split(",")] if isinstance(value, str) else value


def _one_or_many(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


# Fields a YAML file and the command line alike may spell loosely: "a,b" for a list, one target module unlisted.
def _expert_names(value: Any) -> Any:
    """A list of parameter names stays a list (each matched as a name or a path's ending, as PEFT matches them);
    "all-experts" alone is the keyword."""
    names = _listed(value)
    return "all-experts" if names == ["all-experts"] else names


_SPELLINGS: dict[str, Callable[[Any], Any]] = {"labels": _listed, "eval_tasks": _listed, "target_modules": _one_or_many,
              "target_parameters": _expert_names}  # fmt: skip


def build_config(config_file: Path | None, cli: dict[str, Any]) -> TrainConfig:
    """TrainConfig from defaults, then the YAML file, then the options given on the command line (`cli`: the
    values of OPTIONS by name; None is not given). A YAML key is an option's name (dashes allowed: `learning-rate`,
    `rank`, `threads`, ...), read as the command line reads it, or `adapter`: a mapping of the adapter's fields."""
    unknown = sorted(set(cli) - set(_OPTION))
    if unknown:
        raise AdapterError(f"unknown training options {unknown}; `nora train --help` lists them all.")
    values: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    if config_file:
        given = load_yaml(config_file)
        adapter.update(_adapter_mapping(given.pop("adapter", None)))
        yaml_keys = [option.name for option in _current_options() if option.sets is not None]
        for key in given:
            if key not in yaml_keys:
                raise AdapterError(
                    f"config file {config_file}: unknown training option {key!r}{closest(key, yaml_keys)}; its keys "
                    "are the options of `nora train --help` (learning_rate or learning-rate), and adapter: {FIELD: "
                    "VALUE}."
                )
        _set_options(given, values, adapter)
    _set_options(cli, values, adapter)
    values = {key: _SPELLINGS.get(key, _same)(value) for key, value in values.items()}
    return TrainConfig.from_dict({**values, "adapter": adapter})


def _set_options(given: dict[str, Any], values: dict[str, Any], adapter: dict[str, Any]) -> None:
    """Set what each option of `given` (by name; None: not given) sets: a TrainConfig field in `values`, or adapter
    fields. In table order: --adapter-option KEY=VALUE comes after (and beats) --rank & co."""
    for option in _current_options():
        value = given.get(option.name)
        if value is None or option.sets is None:
            continue
        value = option.parse(value)
        if option.sets == "adapter":
            adapter.update(value)
        elif option.sets.startswith("adapter."):
            adapter[option.sets.removeprefix("adapter.")] = value
        else:
            values[option.sets] = value


def _adapter_mapping(adapter: Any) -> dict[str, Any]:
    if adapter is not None and not isinstance(adapter, dict):
        raise AdapterError(f"option adapter={adapter!r} must be dict: the adapter's fields, e.g. adapter: {{r: 8}}.")
    return dict(adapter or {})


def train_command(**options: Any) -> None:
    """Fine-tune an adapter: a causal LM, a text classifier or regressor, an image classifier, a diffusion pipeline."""
    from rich.console import Console

    from ..training import train

    try:
        train_config = build_config(options["config"], options)
        result = train(train_config)
    except AdapterError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # disk full, permissions: the message is enough, a traceback is noise
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; continue from the last checkpoint with --resume latest.") from None
    print_summary(Console(), result.summary, result.adapter_dir)


# typer reads the options from the signature: one keyword parameter per row of OPTIONS
train_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=o.annotation) for o in OPTIONS]
)
train_command.__annotations__ = {o.name: o.annotation for o in OPTIONS}
app.command("train")(train_command)


def print_summary(console, summary: dict[str, Any], adapter_dir: Path) -> None:
    from rich.table import Table

    if not summary:
        return
    table = Table(title="training summary", show_header=False)
    kind = TASKS.get(summary.get("task", ""))
    unit = f"{kind.counts}/s" if kind is not None else "tokens/s"
    rows = [
        ("method", summary["method"]),
        ("steps", f"{summary['steps']} (global batch {summary['global_batch']}, {summary['processes']} process(es))"),
        ("trainable params", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.3f} %)"),
        ("loss", f"{summary['first_loss']:.4f} → {summary['final_loss']:.4f}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s ({summary['tokens_per_s']:,.0f} {unit})"),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB"),
        ("adapter", f"{adapter_dir} ({summary['adapter_bytes'] / 2**10:,.1f} KiB)"),
        ("truncated / dropped", f"{summary['truncated']} / {summary['dropped']} examples"),
    ]
    if summary.get("loftq_error_left") is not None:
        rows.append(("loftq error left", f"{summary['loftq_error_left']:.1%} of the quantization error (mean/layer)"))
    for key, value in summary.items():
        if key.startswith("eval_") and isinstance(value, float):
            before = summary.get(f"initial_{key}")
            rows.append((key, f"{before:.4f} → {value:.4f}" if before is not None else f"{value:.4f}"))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if summary.get("eval_tasks"):
        from ..evaluation.report import print_results

        print_results(summary["eval_tasks"], title="eval tasks", console=console)
