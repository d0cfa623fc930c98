"""Serving many adapters of one base model: a batching engine and an OpenAI-compatible HTTP server (`nora serve`).

The engine needs only torch and transformers; the HTTP app (`create_app`) needs the `serve` extra
(`pip install -e ".[serve]"` in nora's checkout: FastAPI and uvicorn).
"""

from __future__ import annotations

from typing import Any

from .engine import AdapterInfo, Engine, EngineConfig
from .errors import ServingError
from .events import Completion, Event
from .sampling import SamplingParams

__all__ = [
    "AdapterInfo",
    "Completion",
    "Engine",
    "EngineConfig",
    "Event",
    "SamplingParams",
    "Server",
    "ServerSettings",
    "ServingError",
    "create_app",
]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "Server", "ServerSettings"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
