"""Sequence-classification evaluation: predicted labels and their accuracy, macro-F1 and Matthews correlation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import AdapterError
from .loglik import inference, model_device, model_max_length, pad_id
from .tasks import ClassificationExample


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
    predictions: list[int] = []
    try:
        with inference(model, len(examples), desc, progress) as bar:
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                columns = [list(column) for column in zip(*(e.texts for e in batch), strict=True)]
                enc = tokenizer(*columns, padding=True, truncation=True, max_length=limit, return_tensors="pt")
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
                predictions.extend(logits.argmax(-1).tolist())
                bar.update(len(batch))
    finally:
        tokenizer.pad_token, tokenizer.padding_side = restore
    return predictions


def classification_metrics(gold: Sequence[int], predicted: Sequence[int]) -> dict[str, float | int]:
    """Accuracy, macro-F1 over the labels present, and Matthews correlation (the GLUE metric for CoLA)."""
    try:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    except ImportError as e:
        raise AdapterError(
            "classification metrics need scikit-learn: pip install 'nora-peft[eval]' (or scikit-learn)."
        ) from e
    if len(gold) != len(predicted) or not gold:
        raise AdapterError(f"{len(gold)} gold labels and {len(predicted)} predictions: need equal, non-zero counts.")
    return {
        "n": len(gold),
        "correct": sum(int(g == p) for g, p in zip(gold, predicted, strict=True)),
        "acc": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(gold, predicted)),
    }
