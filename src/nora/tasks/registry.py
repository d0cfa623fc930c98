"""Every task kind by its `--task` name. A new kind is one TaskKind subclass and one `register` line."""

from __future__ import annotations

from ..errors import AdapterError
from .base import TaskKind
from .causal_lm import CausalLM
from .dreambooth import DreamBooth
from .image_cls import ImageClassification
from .regression import Regression
from .seq_cls import SequenceClassification

TASKS: dict[str, TaskKind] = {}
DEFAULT_TASK = "causal-lm"  # what `nora train` trains, and what a model without a head record is
GLUE_TASK = "seq-cls"  # what scores a GLUE file on a model whose adapter records no head: a new classifier head


def register(kind: TaskKind) -> TaskKind:
    """Add `kind` under its name (a kind of that name is replaced)."""
    TASKS[kind.name] = kind
    return kind


def task_kind(name: str) -> TaskKind:
    """The kind named `name`, or nora's error listing the kinds."""
    if name not in TASKS:
        raise AdapterError(f"task={name!r}: choose one of {tuple(TASKS)}.")
    return TASKS[name]


register(CausalLM())
register(SequenceClassification())
register(Regression())
register(ImageClassification())
register(DreamBooth())
