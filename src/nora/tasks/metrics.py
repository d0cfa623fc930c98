"""What a classifier's or regressor's predictions score: shared by training's evaluation and `nora eval`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import AdapterError


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
