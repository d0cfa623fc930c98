"""OpenAI response shapes: whole completions, streamed chunks (Server-Sent Events), usage and model entries."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import Busy, GenerationFailed, ServingError
from .events import Event, EventStream


@dataclass
class Shape:
    """One response's identity: which endpoint (chat or plain completion) and what the client called the model."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def delta(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def body(self, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def complete(stream: EventStream, shape: Shape, count: int) -> dict:
    """Wait for every request of `stream` and answer in one body."""
    texts = [""] * count
    finals: list[Event] = [Event()] * count
    async for index, event in stream:
        texts[index] += event.text
        if event.finish_reason is not None:
            finals[index] = event
    failed = next((e for e in finals if e.error), None)
    if failed is not None:
        raise failure(failed)
    choices = [shape.choice(i, texts[i], e.finish_reason) for i, e in enumerate(finals)]
    prompt = sum(e.prompt_tokens for e in finals)
    return shape.body(choices, usage(prompt, sum(e.completion_tokens for e in finals)))


def failure(event: Event) -> ServingError:
    """The error a request's final event reports: 503 when the server shut down, else 500."""
    assert event.error is not None
    if event.error_code == "server_shutdown":
        return Busy(event.error, code="server_shutdown")
    return GenerationFailed(event.error, code=event.error_code)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_chunks(stream: EventStream, shape: Shape, count: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events: one chunk per released piece of text, a last chunk per choice with its finish
    reason, optionally a usage chunk, then `data: [DONE]`. A request that fails (its adapter failed, or the server shut
    down before it finished) ends with an error event, `{"error": {...}, "index": i}`, instead of its last chunk; the
    stream still ends with `data: [DONE]`. Closing the connection cancels the requests."""
    try:
        if shape.chat:
            for i in range(count):
                yield sse(shape.body([shape.delta(i, "", None, role=True)], None, chunk=True))
        prompt_tokens = completion_tokens = 0
        async for index, event in stream:
            if event.error:
                yield sse({**failure(event).body(), "index": index})
                continue
            if event.finish_reason is not None:
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
            text = event.text if event.text or not shape.chat else None
            yield sse(shape.body([shape.delta(index, text, event.finish_reason)], None, chunk=True))
        if include_usage:
            yield sse(shape.body([], usage(prompt_tokens, completion_tokens), chunk=True))
        yield sse("[DONE]")
    finally:
        stream.cancel()  # a no-op for requests that finished


def model_entry(name: str, created: int, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "nora", "root": name, "parent": parent}
