"""What stands in front of the endpoints: the optional bearer token and the request-size limit."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import TooLarge, Unauthorized

_BEARER = HTTPBearer(auto_error=False)


def bearer_auth(api_key: str | None) -> Callable[..., Awaitable[None]]:
    """A dependency that requires `Authorization: Bearer <api_key>` (nothing when api_key is None)."""

    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise Unauthorized("missing API key: send the header `Authorization: Bearer <key>`.")
        if not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise Unauthorized("invalid API key: send the key the server was started with (--api-key).")

    return check


def too_large(max_bytes: int) -> TooLarge:
    return TooLarge(
        f"the request body is larger than this server's limit of {max_bytes} bytes (--max-request-bytes); "
        "send a shorter prompt."
    )


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTP exceptions on, so the handler answers 413."""

    def __init__(self, max_bytes: int) -> None:
        self.error = too_large(max_bytes)
        super().__init__(413, self.error.message)


class BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` with 413, from its Content-Length when given, else as it
    streams in (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            error = too_large(self.max_bytes)
            await JSONResponse(error.body(), status_code=error.status_code)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
