"""The `nora` command line. Each sub-command lives in its own module, which registers itself on `app`; a module
that is not there yet is skipped."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="nora",
    help="Nested low-rank adaptation (NoRA), SVFit and SVD-based adapters: train, evaluate and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """nora: SVD-based adapters for any PyTorch model."""


def _register(module: str) -> None:
    try:
        importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            raise


for _module in ("train", "demo", "plot", "convert", "eval", "serve", "generate", "export", "hub_cache", "federate"):
    _register(_module)
