"""Regression: one number per text (or text pair), e.g. STS-B's similarity: a one-output head, mean squared error,
and Pearson and Spearman correlations (data.encode_regression)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Example, Loss
from .data import Encoded, encode_regression, pad_inputs
from .seq_cls import SequenceClassification, classifier_inputs

if TYPE_CHECKING:
    from ..training.config import TrainConfig
    from .records import Head


class Regression(SequenceClassification):
    name = "regression"
    has_label_set = False
    predicts_number = True

    def encode(
        self, config: TrainConfig, processor: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        return encode_regression(
            rows, processor, config.max_length, source, config.text_column, config.text_pair_column,
            config.label_column,
        )  # fmt: skip

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        batch = pad_inputs(examples, pad_id)
        batch["labels"] = torch.tensor([float(e["label"]) for e in examples])
        return batch

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        output = model(**classifier_inputs(batch))
        predicted = output.logits.float().squeeze(-1)
        return Loss(F.mse_loss(predicted, batch["labels"].float(), reduction="sum") / num_items, output)

    def head_width(self, labels: list[str] | None) -> int:
        return 1

    def label_model(self, model: nn.Module, labels: list[str] | None) -> None:
        model.config.problem_type = "regression"

    def head_record(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        return {"task": self.name}

    def record_fits(self, head: Head) -> bool:
        return True

    def eval_records(self, batch: Batch, output: Any) -> list[tuple[float, float]]:
        predicted = output.logits.float().squeeze(-1)
        return list(zip(batch["labels"].tolist(), predicted.tolist(), strict=True))

    def metrics(self, records: list[tuple[float, float]]) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        gold, predicted = (list(v) for v in zip(*records, strict=True))
        if len(records) < 2 or len(set(predicted)) < 2 or len(set(gold)) < 2:
            return {}  # a correlation is undefined for constant values (or one pair)
        return {"pearson": float(pearsonr(gold, predicted)[0]), "spearman": float(spearmanr(gold, predicted)[0])}
