"""Training: `nora.training.train(TrainConfig(...))`, the engine behind `nora train` and `nora demo`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TrainConfig, load_yaml
from .tasks import TASKS, Task

if TYPE_CHECKING:
    from .build import load_model_and_tokenizer
    from .trainer import TrainingError, TrainResult, train

_ENGINE = {
    "TrainResult": "trainer",
    "TrainingError": "trainer",
    "train": "trainer",
    "load_model_and_tokenizer": "build",
}


def __getattr__(name: str) -> Any:
    # The engine (Accelerate, rich) loads on first use: the CLI reads TASKS and TrainConfig for its option table
    # at start-up, and every `nora` command would otherwise pay for it.
    if name in _ENGINE:
        import importlib

        return getattr(importlib.import_module(f".{_ENGINE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TASKS",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "load_model_and_tokenizer",
    "load_yaml",
    "train",
]
