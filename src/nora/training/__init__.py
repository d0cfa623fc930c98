"""Training: `nora.training.train(TrainConfig(...))`, the engine behind `nora train` and `nora demo`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TrainConfig, load_yaml
from .tasks import TASKS, Task

if TYPE_CHECKING:
    from .trainer import TrainingError, TrainResult, load_model_and_tokenizer, train

_ENGINE = ("TrainResult", "TrainingError", "load_model_and_tokenizer", "train")


def __getattr__(name: str) -> Any:
    # The engine (Accelerate, rich) loads on first use: the CLI reads TASKS and TrainConfig for its option table
    # at start-up, and every `nora` command would otherwise pay for it.
    if name in _ENGINE:
        from . import trainer

        return getattr(trainer, name)
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
