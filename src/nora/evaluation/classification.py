"""Sequence-classification evaluation: predicted labels and their accuracy, F1 and Matthews correlation; and for a
regression head, predicted numbers and their Pearson and Spearman correlations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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


def accuracy_stderr(correct: int, n: int) -> float:
    """The standard error of an accuracy over n items, lm-evaluation-harness's: the sample standard deviation of
    the 0/1 outcomes over √n, i.e. √(p(1−p)/(n−1)); 0 for a single item."""
    if n < 2:
        return 0.0
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))


def classification_metrics(gold: Sequence[int], predicted: Sequence[int]) -> dict[str, float | int]:
    """Accuracy, macro-F1 over the labels present, Matthews correlation (GLUE's CoLA metric) and, for two classes,
    the F1 of class 1 (GLUE's MRPC and QQP metric)."""
    try:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    except ImportError as e:
        raise AdapterError(
            'classification metrics need scikit-learn: pip install -e ".[eval]" in nora\'s checkout (or pip install '
            "scikit-learn)."
        ) from e
    if len(gold) != len(predicted) or not gold:
        raise AdapterError(f"{len(gold)} gold labels and {len(predicted)} predictions: need equal, non-zero counts.")
    return {
        "n": len(gold),
        "correct": sum(int(g == p) for g, p in zip(gold, predicted, strict=True)),
        "acc": float(accuracy_score(gold, predicted)),
        "acc_stderr": accuracy_stderr(sum(int(g == p) for g, p in zip(gold, predicted, strict=True)), len(gold)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(gold, predicted)),
        **({"f1": float(f1_score(gold, predicted, zero_division=0))} if set(gold) | set(predicted) <= {0, 1} else {}),
    }


def regression_metrics(gold: Sequence[float], predicted: Sequence[float]) -> dict[str, float | int]:
    """Pearson and Spearman correlations (GLUE's STS-B metrics) and the mean squared error."""
    from scipy.stats import pearsonr, spearmanr

    if len(gold) != len(predicted) or len(gold) < 2:
        raise AdapterError(f"{len(gold)} targets and {len(predicted)} predictions: need equal counts of at least 2.")
    constant = len(set(gold)) < 2 or len(set(predicted)) < 2  # a correlation is undefined
    return {
        "n": len(gold),
        "pearson": math.nan if constant else float(pearsonr(gold, predicted)[0]),
        "spearman": math.nan if constant else float(spearmanr(gold, predicted)[0]),
        "mse": sum((g - p) ** 2 for g, p in zip(gold, predicted, strict=True)) / len(gold),
    }
