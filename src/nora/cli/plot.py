"""`nora plot`: a training run's learning curves and, with --spectrum, the singular values of its adapted
layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from . import app


@app.command("plot")
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (holding log.jsonl and adapter/).")],
    spectrum: Annotated[
        bool, typer.Option("--spectrum", help="Also plot the singular values of adapted layers (loads the base).")
    ] = False,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer",
            "-l",
            help="Adapted layer for --spectrum (full name or suffix); repeat. Default: the first and the last.",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model for --spectrum (default: the one the adapter recorded).")
    ] = None,
) -> None:
    """Write RUN_DIR/curves.png (loss, learning rate, evaluation metrics) and, with --spectrum,
    RUN_DIR/spectrum.png; print the paths written."""
    from ..plots import ADAPTER_DIR, SPECTRUM_NAME, plot_curves, plot_spectrum

    if layer and not spectrum:
        raise typer.BadParameter("--layer chooses layers for --spectrum; add --spectrum.")
    if base and not spectrum:
        raise typer.BadParameter("--base is the base model for --spectrum; add --spectrum.")
    from .preflight import check_writable

    try:
        if run_dir.is_dir() and (run_dir / "log.jsonl").is_file():  # (what is missing is named by plot_curves)
            check_writable(run_dir / "curves.png", "RUN_DIR")
        typer.echo(plot_curves(run_dir))
        if spectrum:
            adapter = run_dir / ADAPTER_DIR
            if not adapter.is_dir():
                raise AdapterError(
                    f"{adapter} does not exist: --spectrum needs the run's final adapter (written when training ends)."
                )
            typer.echo(plot_spectrum(adapter, layer, base, run_dir / SPECTRUM_NAME))
    except (AdapterError, OSError) as e:
        raise typer.BadParameter(str(e)) from e
