"""`nora convert`: other checkpoint formats to Hugging Face transformers directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from . import app

convert_app = typer.Typer(
    help="Convert checkpoints from other formats to transformers directories.", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")


@convert_app.command("llama2c")
def llama2c(
    checkpoint: Annotated[
        Path, typer.Argument(help="llama2.c model file (legacy float32 format, e.g. stories15M.bin).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the LlamaForCausalLM model to.")],
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", "-t", help="llama2.c tokenizer.bin to convert alongside.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists and is not empty.")] = False,
) -> None:
    """Convert a llama2.c checkpoint (and its tokenizer) to a transformers LlamaForCausalLM directory."""
    from ..convert import convert_llama2c
    from .preflight import check_writable

    try:
        check_writable(out, "--out")  # before the checkpoint is read and converted
        path = convert_llama2c(checkpoint, tokenizer, out, overwrite=overwrite)
    except AdapterError as e:
        raise typer.BadParameter(str(e)) from e
    except OSError as e:  # checked writable at the start: the disk filled up, or the folder changed since
        raise typer.BadParameter(f"--out {out}: the model could not be written ({e}); nothing there was changed. "
                                 "Free some space (or fix the folder) and run it again.") from e  # fmt: skip
    typer.echo(f"converted {checkpoint} -> {path}" + ("" if tokenizer else " (no tokenizer: pass --tokenizer)"))
