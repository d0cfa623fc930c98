"""The HTTP server: OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models`, where `model`
names an adapter (or the base model), plus `POST /v1/adapters` and `DELETE /v1/adapters/{name}` to load and
unload adapters while serving. Every error is answered in OpenAI's `{"error": {...}}` form.

`Server` runs the app with uvicorn and shuts down gracefully: it stops accepting connections, gives the running
requests `shutdown_timeout_s` to finish, then ends each with an error event and `[DONE]` (a whole-body request with
503), and only then lets uvicorn close what is left. A client that goes away, or a request uvicorn still has to
cancel, is one log line, never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..layers import BASE
from .engine import Engine
from .errors import BadRequest, Forbidden, LimitExceeded, NotFound, ServingError, Unprocessable
from .guards import BodyLimit, BodyTooLarge, bearer_auth
from .protocol import ChatRequest, CompletionRequest, LoadAdapterRequest
from .responses import Shape, complete, model_entry, stream_chunks
from .sampling import SamplingParams

log = logging.getLogger(__name__)
NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "missing"}
FLUSH_S = 5.0  # after the shutdown deadline: time for the last events to reach the clients before uvicorn cancels


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # None: no authentication
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for (and the default for chat)
    max_request_bytes: int = 1_000_000
    adapter_root: Path | None = None  # POST /v1/adapters loads only below it; None: loading over HTTP is off
    base_name: str = BASE  # what clients call the base model ("__base__" is accepted too)
    shutdown_timeout_s: float = 30.0  # on shutdown, running requests get this long to finish


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; it starts the engine's worker on startup and drains it on shutdown."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop, settings.shutdown_timeout_s)

    app = FastAPI(title="nora serve", summary="many adapters, one base model, one batch", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(QuietCancel)
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_auth(settings.api_key))])
    tokenizer = engine.tokenizer

    def adapter_of(model: str) -> str:
        return BASE if model in (BASE, settings.base_name) else model

    def prompt_ids(text: str | list[int], special: bool = True) -> list[int]:
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError as e:  # JSON lets "\ud800" through: a lone surrogate is no text
                raise BadRequest(f"the prompt is not valid Unicode ({e.reason}); send UTF-8 text.", "prompt") from e
        ids = list(text) if isinstance(text, list) else tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > settings.max_prompt_tokens:
            raise LimitExceeded(
                f"the prompt has {len(ids)} tokens; this server takes at most {settings.max_prompt_tokens} "
                "(--max-prompt-tokens). Shorten the prompt.",
                "prompt",
            )
        return ids

    def sampling(body: CompletionRequest | ChatRequest, asked: int | None, longest_prompt: int) -> SamplingParams:
        if asked is not None and asked > settings.max_new_tokens:
            raise BadRequest(
                f"max_tokens={asked} is above this server's limit of {settings.max_new_tokens} (--max-new-tokens).",
                "max_tokens",
            )
        if asked is None:  # as much as the server allows and the context still holds
            asked = settings.max_new_tokens
            if engine.context_length is not None:
                asked = max(min(asked, engine.context_length - longest_prompt), 1)
        return SamplingParams(asked, body.temperature, body.top_p, body.seed, body.stop_strings())

    async def answer(body: CompletionRequest | ChatRequest, shape: Shape, prompts: list[list[int]], asked: int | None):
        params = sampling(body, asked, max(len(p) for p in prompts))
        stream = engine.open_stream(prompts, adapter_of(body.model), params)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chunks(stream, shape, len(prompts), usage), media_type="text/event-stream")
        try:
            return await complete(stream, shape, len(prompts))
        finally:
            stream.cancel()

    @v1.post("/completions")
    async def completions(body: CompletionRequest) -> Any:
        prompts = await run_in_threadpool(lambda: [prompt_ids(p) for p in body.prompts()])
        return await answer(body, Shape(chat=False, model=body.model), prompts, body.max_tokens)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest(
                "this model's tokenizer has no chat template, so chat messages cannot be formatted; use "
                "/v1/completions, or start the server with --chat-template FILE.",
                "messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]

        def render() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # the template itself refuses (e.g. roles that must alternate)
                raise BadRequest(f"the chat template rejected the messages: {e}", "messages") from e
            return prompt_ids(text, special=False)

        prompts = [await run_in_threadpool(render)]
        asked = body.max_completion_tokens or body.max_tokens
        return await answer(body, Shape(chat=True, model=body.model), prompts, asked)

    def model_list() -> list[dict]:
        base = model_entry(settings.base_name, int(time.time()), None)
        return [base] + [model_entry(a.name, a.created, settings.base_name) for a in engine.adapters()]

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": model_list()}

    @v1.get("/models/{model:path}")
    async def model(model: str) -> dict:
        for entry in model_list():
            if entry["id"] == model or (model == BASE and entry["parent"] is None):
                return entry
        raise NotFound(f"model {model!r} is not loaded; GET /v1/models lists what is.", "model")

    @v1.post("/adapters", status_code=201)
    async def load_adapter(body: LoadAdapterRequest) -> dict:
        if settings.adapter_root is None:
            raise Forbidden(
                "loading adapters over HTTP is off; start the server with --adapter-root DIR to allow loading "
                "adapters saved below DIR."
            )
        root = settings.adapter_root.resolve()
        try:
            path = (root / body.path).resolve()
            is_dir = path.is_dir()
        except (OSError, ValueError) as e:  # a NUL byte, a name too long, a link loop
            raise BadRequest(f"path {body.path!r} is not a usable path ({e}).", "path") from e
        if not path.is_relative_to(root):
            raise Forbidden(f"path {body.path!r} lies outside the adapter root; give a path inside it.", "path")
        if not is_dir:
            raise NotFound(f"no adapter directory {body.path!r} under the adapter root.", "path", "adapter_not_found")
        escape = _leaves_root(root, path)
        if escape:
            raise Forbidden(f"adapter {body.path!r} {escape} outside the adapter root; keep it inside.", "path")
        if body.name == settings.base_name:
            raise BadRequest(f"{body.name!r} is the base model's name; pick another adapter name.", "name")
        load_ms = await asyncio.wrap_future(engine.request_load(body.name, str(path)))
        entry = model_entry(body.name, int(time.time()), settings.base_name)
        return {**entry, "load_ms": round(load_ms, 3)}

    @v1.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        unload_ms = await asyncio.wrap_future(engine.request_unload(name))
        return {"id": name, "object": "model", "deleted": True, "unload_ms": round(unload_ms, 3)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters": len(engine.adapters())}

    app.include_router(v1)
    return app


class Server(uvicorn.Server):
    """uvicorn's server for `create_app(engine, settings)`: on shutdown (SIGINT, SIGTERM, `should_exit`) the engine
    is closed with the settings' deadline before uvicorn waits for the connections, so every stream ends with its
    own events (at worst an error event) and `[DONE]` rather than being cut."""

    def __init__(self, engine: Engine, settings: ServerSettings, **config: Any) -> None:
        self.engine, self.settings = engine, settings
        config.setdefault("timeout_graceful_shutdown", max(int(settings.shutdown_timeout_s + FLUSH_S), 1))
        super().__init__(uvicorn.Config(create_app(engine, settings), **config))

    async def shutdown(self, sockets: list | None = None) -> None:
        self.engine.close(self.settings.shutdown_timeout_s)
        await super().shutdown(sockets)


class QuietCancel:
    """ASGI middleware: a request task cancelled (its client went away, or uvicorn gave up on it at shutdown) ends
    quietly with one log line; uvicorn would log a CancelledError traceback for each."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise
            log.info("%s %s: cancelled before it finished (client gone, or server shutdown)", scope.get("method"),
                     scope.get("path"))  # fmt: skip


def _leaves_root(root: Path, adapter: Path) -> str | None:
    """What of the adapter directory `adapter` lies outside `root`, if anything: one of its files (a symlink), or
    the basis cache its config would read and write."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).resolve().is_relative_to(root):
            return f"links its {name} to a file"
    try:
        cache = json.loads((adapter / "adapter_config.json").read_text()).get("basis_cache_dir")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable or not an object: the load refuses it with the reason
    try:
        outside = isinstance(cache, str) and not Path(cache).resolve().is_relative_to(root)
    except (OSError, ValueError):
        outside = True
    return f"keeps its basis cache (basis_cache_dir={cache!r})" if outside else None


def _install_error_handlers(app: FastAPI) -> None:
    def reply(error: ServingError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return JSONResponse(error.body(), status_code=error.status_code, headers=headers)

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            reason = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
            return reply(BadRequest(f"the request body is not valid JSON ({reason}); send a JSON object."))
        if any(tuple(e["loc"]) == ("body",) and e.get("type") in NOT_AN_OBJECT for e in errors):
            return reply(BadRequest("the request body must be a JSON object (Content-Type: application/json)."))
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        first = errors[0]["loc"][1] if errors and len(errors[0]["loc"]) > 1 else None
        return reply(Unprocessable(f"invalid request: {where}", None if first is None else str(first)))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return reply(exc.error)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            {"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error", "code": None}},
            status_code=500,
        )
