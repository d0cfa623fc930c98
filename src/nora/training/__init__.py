"""Training: `nora.training.train(TrainConfig(...))`, the engine behind `nora train` and `nora demo`."""

from .config import DEFAULT_ADAPTER, DEFAULT_LR, TrainConfig, load_yaml
from .trainer import TrainingError, TrainResult, load_model_and_tokenizer, train

__all__ = [
    "DEFAULT_ADAPTER",
    "DEFAULT_LR",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "load_model_and_tokenizer",
    "load_yaml",
    "train",
]
