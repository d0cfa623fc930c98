"""Causal LM: next-token prediction on instruction, prompt/completion or plain-text data (data.encode_causal)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..loss import causal_lm_chunked_loss
from .base import Batch, Example, Loss, TaskKind
from .data import IGNORE, Encoded, encode_causal, pad_inputs, pad_token_labels

if TYPE_CHECKING:
    from ..training.config import TrainConfig


class CausalLM(TaskKind):
    name = "causal-lm"

    def encode(
        self, config: TrainConfig, processor: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        return encode_causal(rows, processor, config.max_length, config.mask_prompt, source, config.text_column)

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        batch = pad_inputs(examples, pad_id)
        batch["labels"] = pad_token_labels(examples, batch["input_ids"].shape[1])
        return batch

    def count_targets(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # each token predicts the next

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        # nora's chunked head where the trainer set it (nora.loss), else the model's own loss (with Liger's fused
        # kernels, computed without materialising the logits too)
        chunked = causal_lm_chunked_loss(model, batch, num_items)
        if chunked is not None:
            return Loss(*chunked)
        output = model(**batch, num_items_in_batch=num_items)
        return Loss(output.loss, output)
