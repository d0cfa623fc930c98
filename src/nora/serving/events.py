"""What flows between the engine's worker thread and its callers: requests in, events out (text pieces as they
are released, then one final event with the finish reason and the token counts)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from .sampling import SamplingParams


@dataclass(frozen=True)
class Event:
    text: str = ""  # the newly released text (may be empty on the final event)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort" or "error"; None: more follows
    token_ids: tuple[int, ...] = ()  # on the final event: every generated token
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # on a final event with finish_reason "error" (or "abort" at shutdown): what happened
    error_code: str | None = None  # with `error`: generation_failed, adapter_failed or server_shutdown


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    sink: Callable[[Event], None]  # called on the worker thread, once per event
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); it ends with finish_reason "abort"."""
        self.cancelled = True


class EventStream:
    """The events of one or more requests submitted together, for asyncio code: `async for index, event in
    stream`; ends after every request's final event. Create it on the event loop's thread."""

    def __init__(self, count: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._open = count
        self.requests: list[GenerationRequest] = []

    def sink(self, index: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

        return put

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if self._open == 0:
            raise StopAsyncIteration
        index, event = await self._queue.get()
        if event.finish_reason is not None:
            self._open -= 1
        return index, event
