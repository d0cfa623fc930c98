"""`nora export`: a saved nora adapter as a standard LoRA adapter other tools load — PEFT's directory
(`PeftModel.from_pretrained`, vLLM) or, for a DreamBooth adapter, diffusers' `pytorch_lora_weights.safetensors`
(`pipeline.load_lora_weights`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from . import app

FORMATS = ("peft", "diffusers")


@app.command("export")
def export(
    adapter: Annotated[Path, typer.Argument(help="A nora adapter directory (nora train writes RUN/adapter).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The directory to write.")],
    format: Annotated[str, typer.Option(help="peft (default for models) or diffusers (default for pipelines).")] = (
        "auto"
    ),
    base: Annotated[
        str | None, typer.Option(help="The base model: directory, hub id or .gguf file (default: recorded).")
    ] = None,
    gguf_file: Annotated[str | None, typer.Option(help="Load this GGUF file from the base (dequantised).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --output if it holds files.")] = False,
) -> None:
    """Write ADAPTER as a LoRA adapter with exactly its ΔW (ranks and scales folded in)."""
    try:
        path = export_adapter(adapter, output, format, base, overwrite, gguf_file)
    except AdapterError as e:
        raise typer.BadParameter(str(e)) from e
    except OSError as e:  # checked writable at the start: the disk filled up, or the folder changed since
        raise typer.BadParameter(f"--output {output}: the export could not be written ({e}); nothing there was "
                                 "changed. Free some space (or fix the folder) and run it again.") from e  # fmt: skip
    typer.echo(f"exported {adapter} -> {path}")


def export_adapter(
    adapter: Path, output: Path, format: str, base: str | None, overwrite: bool, gguf_file: str | None = None
) -> Path:
    from ..evaluation.loading import RECORDED_BASE, adapter_head, load_for_eval, resolve_target
    from ..export import export_diffusers_lora, export_lora
    from ..pretrained import check_model_source, looks_local
    from .preflight import check_writable

    if format not in (*FORMATS, "auto"):
        raise AdapterError(f"--format {format!r}: choose peft or diffusers.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise AdapterError(f"--output {output} exists and is not empty; pass --overwrite to replace it.")
    check_writable(output, "--output")
    if not (adapter / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter}: no such adapter directory (adapter_config.json); check the path.")
    target = resolve_target(str(adapter), None, base)
    if target.adapter_kind != "nora":
        raise AdapterError(f"{adapter} is already a PEFT adapter; PEFT and diffusers load it as it is.")
    pipeline = (Path(target.base).expanduser() / "model_index.json").is_file() or (
        not looks_local(target.base) and format == "diffusers"
    )
    format = format if format != "auto" else "diffusers" if pipeline else "peft"
    if (format == "diffusers") != pipeline:
        raise AdapterError(
            f"--format {format} does not fit {target.base}: a diffusers pipeline's adapter exports with --format "
            "diffusers, a transformers model's with --format peft."
        )
    if pipeline:
        from ..diffusion import DreamBoothModel, check_pipeline
        from ..model import AdaptedModel

        check_pipeline(target.base)
        model = AdaptedModel.from_pretrained(DreamBoothModel.from_pretrained(target.base), target.adapter)
        export_diffusers_lora(model, "default", output)
        return output
    head = adapter_head(target)
    if head is not None and head.template is not None:
        raise AdapterError(
            f"{adapter} is a CLIP zero-shot classifier (nora.clip.ClipClassifier), which has no PEFT model class; "
            "export it from Python: AdaptedModel.from_pretrained(ClipClassifier..., DIR).export_lora(OUT)."
        )
    check_model_source(target.base, gguf_file, "--base" if base else RECORDED_BASE)
    model, _ = load_for_eval(target, None, head.num_labels if head else None, "float32", "cpu", False, gguf_file)
    export_lora(model, "default", output)
    return output
