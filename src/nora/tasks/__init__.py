"""Task kinds: one module per kind of training (causal LM, sequence classification, regression, image
classification, DreamBooth), each owning its options, model, data, loss and metrics; one registry."""

from .base import Batch, Example, Loss, OptionRow, TaskKind, TaskOptions
from .records import Head, read_head
from .registry import TASKS, register, task_kind

__all__ = ["TASKS", "Batch", "Example", "Head", "Loss", "OptionRow", "TaskKind", "TaskOptions", "read_head", "register",
           "task_kind"]  # fmt: skip
