"""Sequence classification: one label per text (or text pair), predicted by a classification head
(data.encode_classification); accuracy, F1 and Matthews correlation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..pretrained import name_labels
from .base import Batch, Example, Loss, TaskKind, two_classes
from .data import Encoded, encode_classification, pad_inputs
from .metrics import classification_metrics

if TYPE_CHECKING:
    from ..training.config import TrainConfig


class SequenceClassification(TaskKind):
    name = "seq-cls"
    model_class = "AutoModelForSequenceClassification"
    model_kind = "seq-cls"
    has_label_set = True
    adapter_defaults = {"modules_to_save": ["classifier", "score", "pooler"]}  # head (+ BERT's pooler) trains in full

    def encode(
        self, config: TrainConfig, processor: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        encoded = encode_classification(
            rows, processor, config.max_length, labels, source,
            config.text_column, config.text_pair_column, config.label_column,
        )  # fmt: skip
        two_classes(encoded.labels, source)
        return encoded

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        batch = pad_inputs(examples, pad_id)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def count_targets(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        output = model(**classifier_inputs(batch))
        return Loss(F.cross_entropy(output.logits.float(), batch["labels"], reduction="sum") / num_items, output)

    def pretrained_kwargs(self, num_labels: int | None) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def label_model(self, model: nn.Module, labels: list[str] | None) -> None:
        name_labels(model, labels)

    def head_record(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        return {"task": self.name, "labels": list(labels or [])}

    def eval_records(self, batch: Batch, output: Any) -> list[tuple[int, int]]:
        return list(zip(batch["labels"].tolist(), output.logits.argmax(-1).tolist(), strict=True))

    def metrics(self, records: list[tuple[int, int]]) -> dict[str, float]:
        gold, predicted = zip(*records, strict=True)
        scores = classification_metrics(list(gold), list(predicted))
        return {k: float(v) for k, v in scores.items() if k not in ("n", "correct")}


def classifier_inputs(batch: Batch) -> Batch:
    """What a classifier reads of a batch: its tokens, mask, and (BERT's text pairs) segment ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
