"""Sequence-classification evaluation: predicted labels and their accuracy, F1 and Matthews correlation; and for a
regression head, predicted numbers and their Pearson and Spearman correlations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import AdapterError
from ..tasks.metrics import accuracy_stderr, classification_metrics, regression_metrics
from .loglik import inference, model_device, model_max_length, pad_id
from .tasks import ClassificationExample

__all__ = ["accuracy_stderr", "classification_metrics", "predict_labels", "predict_logits", "regression_metrics"]


def predict_labels(
    model: nn.Module,
    tokenizer,
    examples: Sequence[ClassificationExample],
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "classify",
) -> list[int]:
    """The argmax label of each example (one text, or a pair), in order."""
    logits = predict_logits(model, tokenizer, examples, batch_size, max_length, progress, desc)
    return logits.argmax(-1).tolist()


def predict_logits(
    model: nn.Module,
    tokenizer,
    examples: Sequence[ClassificationExample],
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "classify",
) -> torch.Tensor:
    """The head's outputs for each example (one text, or a pair), in order: examples × outputs, float32 on CPU."""
    if batch_size < 1:
        raise AdapterError(f"batch_size={batch_size} must be at least 1.")
    limit = min(max_length or 512, model_max_length(model, tokenizer))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_id(tokenizer)  # decoder-only classifiers find each row's last token by it
    restore = (tokenizer.pad_token, tokenizer.padding_side)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    device = model_device(model)
    predictions: list[torch.Tensor] = []
    try:
        with inference(model, len(examples), desc, progress) as bar:
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                columns = [list(column) for column in zip(*(e.texts for e in batch), strict=True)]
                enc = tokenizer(*columns, padding=True, truncation=True, max_length=limit, return_tensors="pt")
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
                predictions.append(logits.detach().float().cpu())
                bar.update(len(batch))
    finally:
        tokenizer.pad_token, tokenizer.padding_side = restore
    return torch.cat(predictions) if predictions else torch.empty(0, 0)
