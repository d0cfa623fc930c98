"""`nora eval`: a base model, a merged model or an adapter on the commonsense suite (log-likelihood and generation
protocols), on GLUE classification tasks, or, for an adapter that trained a head, on any labelled file scored with
that head's label set (or as regression); a table on the terminal and, with --output, JSON. See
docs/evaluation.md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..errors import AdapterError
from . import app


def _split(values: list[str] | None, default: list[str]) -> list[str]:
    return [part.strip() for value in values or default for part in value.split(",") if part.strip()] or default


@app.command("eval")
def evaluate(
    model: Annotated[
        str, typer.Argument(help="Base or merged model (directory, hub id or .gguf file), or an adapter directory.")
    ],
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            "-t",
            help="Tasks (boolq, arc-e, sst2, ...), suites (commonsense, glue), .json/.tsv files, or a folder of them.",
        ),
    ] = None,
    protocol: Annotated[
        list[str] | None, typer.Option("--protocol", "-p", help="loglik, loglik-label and/or generate.")
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="A nora or PEFT adapter directory to put on MODEL.")] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model of an adapter given as MODEL (default: the one it records).")
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(envvar="NORA_DATA_DIR", help="Folder with commonsense/<task>/test.json, glue/<task>/dev.tsv."),
    ] = Path("data"),
    limit: Annotated[
        int | None, typer.Option(min=1, help="Examples per task, drawn with --seed (default: all).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the --limit draw.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation protocol: longest response.")] = 32,
    num_beams: Annotated[int, typer.Option(min=1, help="Generation protocol: 1 greedy; LLM-Adapters uses 4.")] = 1,
    max_length: Annotated[
        int | None, typer.Option(min=1, help="Longest input in tokens (default: the model's).")
    ] = None,
    merge: Annotated[bool, typer.Option(help="Fold the adapter into the weights before evaluating.")] = True,
    gguf_file: Annotated[str | None, typer.Option(help="Load this GGUF file from the base (dequantised).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.")] = (
        "auto"
    ),
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1, ...")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the results as JSON here.")] = None,
    log_samples: Annotated[
        bool, typer.Option(help="Keep each example in the JSON: full prompt, each choice's log-likelihood, picks.")
    ] = False,
    num_fewshot: Annotated[
        int, typer.Option(min=0, help="Commonsense: solved examples before each item, drawn with --seed.")
    ] = 0,
    fewshot_from: Annotated[
        str, typer.Option(help="Few-shot pool: train (the task's train.json), test (minus the item), auto.")
    ] = "auto",
    chat_template: Annotated[
        bool, typer.Option(help="Commonsense: wrap prompts in the tokenizer's chat template (instruct models).")
    ] = False,
    text_column: Annotated[
        str | None, typer.Option(help="Labelled files: the text column (default: text, sentence, sentence1, ...).")
    ] = None,
    text_pair_column: Annotated[
        str | None, typer.Option(help="Labelled files: the second text of a pair (default: sentence2, ...).")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Labelled files: the label column (default: label, Quality, score).")
    ] = None,
    max_image_pixels: Annotated[
        int | None, typer.Option(min=1, help="Image classifiers: refuse larger images (default: Pillow's limit).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate MODEL on --tasks and print accuracy per task and on average."""
    from ..evaluation import Columns, evaluate_tasks
    from ..evaluation.fewshot import PromptStyle, require_chat_template
    from ..evaluation.loading import RECORDED_BASE, adapter_head, eval_tokenizer, load_for_eval, resolve_target
    from ..evaluation.report import print_results
    from ..evaluation.runner import PROTOCOLS, prepare_tasks
    from ..evaluation.tasks import missing_suite_tasks, no_head_message
    from ..pretrained import check_model_source, check_threads, parse_dtype, resolve_device
    from ..tasks import task_kind
    from ..tasks.registry import DEFAULT_TASK, GLUE_TASK
    from .preflight import check_writable

    protocols = _split(protocol, ["loglik"])
    try:
        check_threads(threads)
        if threads is not None:
            torch.set_num_threads(threads)
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown:
            raise AdapterError(f"--protocol {', '.join(unknown)}: not a protocol; choose from {', '.join(PROTOCOLS)}.")
        parse_dtype(dtype)
        resolve_device(device)
        if output is not None and output.is_dir():
            raise AdapterError(f"--output {output} is a directory; give a file path such as {output / 'results.json'}.")
        if output is not None:
            check_writable(output, "--output")
        target = resolve_target(model, adapter, base)
        head = adapter_head(target)
        if head is not None and head.kind.reads_images:
            return _evaluate_images(target, head, _split(tasks, []), limit, seed, batch_size, dtype, device, merge,
                                    output, progress, max_image_pixels)  # fmt: skip
        if max_image_pixels is not None:
            raise AdapterError("--max-image-pixels bounds the images of an image classifier's evaluation; this model "
                               "reads text: leave it out.")  # fmt: skip
        names = _split(tasks, ["glue" if head else "commonsense"])
        style = PromptStyle(num_fewshot, fewshot_from, chat_template)  # type: ignore[arg-type]
        columns = Columns(text_column, text_pair_column, label_column)
        prepared = prepare_tasks(names, protocols, data_dir=data_dir, limit=limit, seed=seed, head=head,
                                 columns=columns, style=style)  # fmt: skip
        specs = [task.spec for task in prepared]
        kinds = {spec.kind for spec in specs}
        if len(kinds) > 1:
            raise AdapterError("commonsense tasks need a causal LM and GLUE tasks a classifier: evaluate them apart.")
        unscorable = next((spec for spec in specs if spec.kind == "classification" and not spec.layout), None)
        if unscorable is not None and head is None:
            raise AdapterError(no_head_message(unscorable))
        check_model_source(target.base, gguf_file, "--base" if base else RECORDED_BASE if target.adapter else "MODEL")
        if chat_template:
            require_chat_template(eval_tokenizer(target, gguf_file))
        missing = missing_suite_tasks(names, data_dir)
        for suite, absent in missing.items():
            typer.echo(f"suite {suite}: no file for {', '.join(absent)} under {data_dir}; evaluating the "
                       f"{len(specs)} task(s) found.", err=True)  # fmt: skip
        if head is not None:
            num_labels = head.num_labels
        else:
            num_labels = max((spec.layout.num_labels for spec in specs if spec.layout), default=None)
        kind = task_kind(DEFAULT_TASK)  # commonsense tasks score a causal LM
        if kinds == {"classification"}:  # GLUE scores a sequence classifier: the head's kind, or a new head
            kind = head.kind if head is not None else task_kind(GLUE_TASK)
        start = time.perf_counter()
        loaded, tokenizer = load_for_eval(target, kind, num_labels, dtype, device, merge, gguf_file)
        load_seconds = time.perf_counter() - start
        results = evaluate_tasks(
            loaded,
            tokenizer,
            prepared,
            protocols,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            max_length=max_length,
            progress=progress,
            log_samples=log_samples,
            head=head,
        )
    except (AdapterError, OSError) as e:
        raise typer.BadParameter(str(e)) from e
    print_results(results, title=str(target.adapter or target.base))
    if output is not None:
        payload = {
            "model": model,
            "base": target.base,
            "adapter": str(target.adapter) if target.adapter else None,
            "settings": {
                "protocols": protocols,
                "limit": limit,
                "seed": seed,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "num_beams": num_beams,
                "num_fewshot": num_fewshot,
                "fewshot_from": fewshot_from if num_fewshot else None,
                "chat_template": chat_template,
                "merged": merge,
                "dtype": str(next(loaded.parameters()).dtype),
                "device": str(next(loaded.parameters()).device),
            },
            "missing_tasks": missing,
            "load_seconds": round(load_seconds, 2),
            "eval_seconds": round(time.perf_counter() - start - load_seconds, 2),
            "results": results,
        }
        _write(payload, output)


def _write(payload: dict, output: Path) -> None:
    from ..evaluation.report import write_results

    try:
        write_results(payload, output)
    except OSError as e:  # checked writable at the start: the disk filled up, or the folder changed since
        raise typer.BadParameter(f"--output {output}: the results could not be written ({e}); they are printed "
                                 "above.") from e  # fmt: skip
    typer.echo(f"results written to {output}")


def _evaluate_images(
    target, head, folders, limit, seed, batch_size, dtype, device, merge, output, progress, max_pixels
) -> None:
    """An image classifier's adapter on image folders (or path/label files): top-1 and top-5 per folder."""
    from ..evaluation.images import evaluate_images
    from ..evaluation.loading import load_for_eval
    from ..evaluation.report import print_results
    from ..evaluation.runner import average

    if not folders:
        raise AdapterError("an image classifier is evaluated on image folders: pass --tasks DIR (DIR/<class>/*.jpg).")
    missing = [f for f in folders if not Path(f).exists()]
    if missing:
        raise AdapterError(f"--tasks {missing[0]}: no such image folder or file.")
    loaded, processor = load_for_eval(target, head.kind, head.num_labels, dtype, device, merge)
    per_task = {
        Path(f).name: evaluate_images(
            loaded, processor, f, list(head.labels), batch_size, limit, seed, progress, max_pixels
        )
        for f in folders
    }
    results = {"image-classification": {"tasks": per_task, "average": average(per_task)}}
    print_results(results, title=str(target.adapter))
    if output is not None:
        _write({"base": target.base, "adapter": str(target.adapter), "results": results}, output)
