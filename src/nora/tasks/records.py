"""The head record an adapter file keeps (`adapter_config.json` → nora.head): which kind trained it, its label set,
and for a CLIP classifier its class prompt. `nora eval` and `nora export` rebuild the model from it by asking its
kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from .base import TaskKind
from .registry import TASKS


@dataclass(frozen=True)
class Head:
    """What a trained head predicts, as its adapter records it: class i is `labels[i]`, or one number. `task` is
    the name of the kind that trained it."""

    task: str
    labels: tuple[str, ...] = ()
    template: str | None = None  # a CLIP classifier's class prompt

    @property
    def kind(self) -> TaskKind:
        if self.task not in TASKS:
            raise AdapterError(f"a head of task {self.task!r}: not a task kind nora has; choose from {tuple(TASKS)}.")
        return TASKS[self.task]

    @property
    def num_labels(self) -> int:
        return self.kind.head_width(list(self.labels)) or len(self.labels)


def read_head(record: Any, where: Path) -> Head:
    """The head `record` describes, checked: a kind that writes head records, distinct label names, a template
    with {}."""
    task, labels = (record.get("task"), record.get("labels", [])) if isinstance(record, dict) else (None, None)
    valid_labels = (
        isinstance(labels, list) and all(isinstance(x, str) for x in labels) and len(set(labels)) == len(labels)
    )
    head = Head(task, tuple(labels)) if isinstance(task, str) and task in TASKS and valid_labels else None
    if head is None or not head.kind.record_fits(head):
        writers = ", ".join(name for name, kind in TASKS.items() if kind.has_label_set or kind.predicts_number)
        raise AdapterError(
            f"{where}: the head it records ({str(record)[:120]}) is not a task ({writers}) with a label set of "
            "distinct names; the file was edited or damaged: save the adapter again."
        )
    template = record.get("template")
    if template is not None and (not isinstance(template, str) or "{}" not in template):
        raise AdapterError(
            f"{where}: the head's class prompt template {template!r} has no {{}}; save the adapter again."
        )
    return Head(task, tuple(labels), template)
