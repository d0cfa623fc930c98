"""`nora serve`: an OpenAI-compatible HTTP server for one base model and any number of nora adapters, batching
concurrent requests for different adapters together. See docs/serving.md."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from ..layers import BASE
from . import app

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, an address this server could not listen on (a port another server holds,
    an address not of this machine); uvicorn would find it only after loading, and exit with code 3."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as e:
        raise AdapterError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): another server holds that port, or the address is "
            "not this machine's; choose another --port (0: any free one) or --host, or stop the other server."
        ) from None


def _recorded_base(adapters: dict[str, Path]) -> str:
    """The base model the adapters record, where they agree."""
    from ..evaluation.loading import recorded_base

    if not adapters:
        raise AdapterError("no base model: pass --base (a directory, hub id or .gguf file), or --adapter NAME=PATH.")
    bases = {name: recorded_base(path) for name, path in adapters.items()}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{name}: {base}" for name, base in bases.items())
        raise AdapterError(f"the adapters record different base models ({listed}); pass the one to serve as --base.")
    return next(iter(bases.values()))


@app.command("serve")
def serve(
    base: Annotated[
        str | None,
        typer.Option(help="Base model: a directory, hub id or .gguf file (default: the one the adapters record)."),
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", "-a", help="NAME=PATH of an adapter to load at start; repeat.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="NORA_API_KEY", help="Require `Authorization: Bearer KEY` on /v1.")
    ] = None,
    adapter_root: Annotated[
        Path | None, typer.Option(help="Allow POST /v1/adapters to load adapters saved below this directory.")
    ] = None,
    base_name: Annotated[str, typer.Option(help="The `model` name clients use for the base model.")] = BASE,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer directory or id (default: --base).")] = None,
    chat_template: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A Jinja chat template file to use.")
    ] = None,
    gguf_file: Annotated[str | None, typer.Option(help="Load this GGUF file from the base (dequantised).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1, ...")] = "auto",
    max_batch_size: Annotated[int, typer.Option(min=1, help="Rows decoded together.")] = 16,
    batch_window_ms: Annotated[
        float, typer.Option(min=0, help="An idle server waits this long to batch a burst.")
    ] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests held at once; beyond it: 503.")] = 1024,
    reserve_adapters: Annotated[
        int,
        typer.Option(
            min=0, help="Allocate resident slots for this many adapters up front, so no load has to grow the store."
        ),
    ] = 0,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longest prompt accepted, in tokens.")] = 4096,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="Largest request body accepted.")] = 1_000_000,
    shutdown_timeout: Annotated[
        float,
        typer.Option(min=0, help="Seconds running requests get to finish on exit; then each ends with an error event."),
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help=f"uvicorn log level: {', '.join(LOG_LEVELS)}.")] = "info",
) -> None:
    """Serve the base model and its adapters over HTTP (OpenAI API: /v1/completions, /v1/chat/completions)."""
    try:
        import fastapi  # noqa: F401 - the serve extra, checked before anything loads
        import uvicorn  # noqa: F401

        from ..evaluation.loading import RECORDED_BASE
        from ..pretrained import check_model_source, parse_dtype, resolve_device
        from ..serving import Engine, EngineConfig, Server, ServerSettings
        from ..serving.loading import attach_adapters, load_base, parse_adapter_specs
    except ModuleNotFoundError as e:
        raise typer.BadParameter(
            f'nora serve needs {e.name}: install the serve extra, pip install -e ".[serve]" in nora\'s checkout '
            "(or pip install fastapi uvicorn)."
        ) from e
    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"{log_level!r}: choose one of {', '.join(LOG_LEVELS)}.", param_hint="--log-level")
    if adapter_root is not None and not adapter_root.is_dir():
        raise typer.BadParameter(f"{adapter_root} is not a directory.", param_hint="--adapter-root")
    try:
        specs = parse_adapter_specs(adapter or [])
        parse_dtype(dtype)
        resolve_device(device)
        given = base is not None
        base = base if given else _recorded_base(specs)
        check_model_source(base, gguf_file, "--base" if given else RECORDED_BASE)
        if tokenizer is not None:
            check_model_source(tokenizer, None, "--tokenizer")
        _check_port(host, port)
        model, tok = load_base(base, tokenizer, gguf_file, dtype, device, chat_template)
        model = attach_adapters(model, specs)
    except (AdapterError, OSError) as e:
        raise typer.BadParameter(str(e)) from e
    if api_key is None and not _is_loopback(host):
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it may use it.", err=True)
    engine = Engine(model, tok, EngineConfig(max_batch_size, batch_window_ms / 1000, max_queue, reserve_adapters))
    settings = ServerSettings(
        api_key=api_key,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        max_request_bytes=max_request_bytes,
        adapter_root=adapter_root,
        base_name=base_name,
        shutdown_timeout_s=shutdown_timeout,
    )
    typer.echo(f"nora serve: {base} with adapters {sorted(specs) or 'none'} on http://{host}:{port}/v1")
    Server(engine, settings, host=host, port=port, log_level=log_level).run()
