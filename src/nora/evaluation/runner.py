"""evaluate_tasks: every requested task under every requested protocol, per task and averaged.

Commonsense protocols:
  loglik        lm-evaluation-harness: the log-likelihood of each choice's text given the prompt; `acc` takes the
                highest, `acc_norm` the highest per character of the choice.
  loglik-label  the log-likelihood of the trained response for each label (`the correct answer is answer2`).
  generate      LLM-Adapters/DoRA: decode a response, extract the first label it names, exact match.
Every accuracy comes with its standard error (`acc_stderr`, lm-evaluation-harness's √(p(1−p)/(n−1)); an average's is
that of a mean of independent tasks). Classification tasks (GLUE TSVs, or any labelled file scored with a trained
head's label set) report acc, f1 (two classes), macro_f1 and mcc; a regression head's tasks report pearson, spearman
and mse.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import AdapterError
from .classification import accuracy_stderr, classification_metrics, predict_labels, predict_logits, regression_metrics
from .generation import generate_responses
from .loglik import LoglikRequest, continuation_logliks
from .records import CommonsenseItem, extract_answer
from .tasks import Columns, Head, TaskSpec, load_classification, load_commonsense, resolve_tasks

PROTOCOLS = ("loglik", "loglik-label", "generate")
AVERAGED = ("acc", "acc_norm", "top5_acc", "f1", "macro_f1", "mcc", "pearson", "spearman")


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str | os.PathLike | TaskSpec],
    protocols: Sequence[str] = ("loglik",),
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    max_length: int | None = None,
    progress: bool = False,
    log_samples: bool = False,
    head: Head | None = None,
    columns: Columns | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate `model` (a transformers model, or a nora AdaptedModel) on `tasks`.

    Returns {protocol: {"tasks": {task: metrics}, "average": metrics}}, with "classification" (or "regression") as
    the protocol of labelled files. Metrics hold `n` (examples scored), `correct` and the rates; `limit` draws that
    many examples per task with `seed` (the same draw for every protocol and model). `head` is what a trained
    classifier predicts (its label set, or regression: `nora.evaluation.loading.adapter_head`); with it, any
    labelled file is scored, its columns found by name or given as `columns`. The model's train/eval mode is
    restored."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise AdapterError(f"protocols {unknown or '[]'}: choose from {list(PROTOCOLS)}.")
    options = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    for spec in resolve_tasks(tasks, data_dir, labelled=head is not None):
        if spec.kind == "classification":
            start = time.perf_counter()
            examples = load_classification(spec, limit, seed, head, columns)
            gold = [e.label for e in examples]
            if head is not None and head.task == "regression":
                outputs = predict_logits(model, tokenizer, examples, desc=spec.name, **options)
                if outputs.shape[-1] != 1:
                    raise AdapterError(f"a regression head has one output; this model's head has {outputs.shape[-1]}.")
                protocol, predicted = "regression", outputs[:, 0].tolist()
                metrics = regression_metrics(gold, predicted)
            else:
                protocol = "classification"
                predicted = predict_labels(model, tokenizer, examples, desc=spec.name, **options)
                metrics = classification_metrics(gold, predicted)
            metrics["seconds"] = round(time.perf_counter() - start, 2)
            if log_samples:
                metrics["samples"] = [{"gold": g, "pred": p} for g, p in zip(gold, predicted, strict=True)]
            results.setdefault(protocol, {})[spec.name] = metrics
            continue
        items = load_commonsense(spec, limit, seed)
        scored = score_commonsense(
            model, tokenizer, items, protocols, spec.name, max_new_tokens, num_beams, log_samples, **options
        )
        for protocol, metrics in scored.items():
            results.setdefault(protocol, {})[spec.name] = metrics
    return {protocol: {"tasks": per_task, "average": average(per_task)} for protocol, per_task in results.items()}


def score_commonsense(
    model: nn.Module,
    tokenizer,
    items: Sequence[CommonsenseItem],
    protocols: Sequence[str],
    name: str = "task",
    max_new_tokens: int = 32,
    num_beams: int = 1,
    log_samples: bool = False,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Metrics of one commonsense task under each requested protocol (both log-likelihood protocols share one
    pass over the prompts)."""
    scored: dict[str, dict[str, Any]] = {}
    if {"loglik", "loglik-label"} & set(protocols):
        scored.update(_loglik_protocols(model, tokenizer, items, protocols, name, log_samples, options))
    if "generate" in protocols:
        scored["generate"] = _generate_protocol(
            model, tokenizer, items, name, max_new_tokens, num_beams, log_samples, options
        )
    return scored


def _loglik_protocols(model, tokenizer, items, protocols, name, log_samples, options) -> dict[str, dict[str, Any]]:
    by_text, by_label = "loglik" in protocols, "loglik-label" in protocols
    start = time.perf_counter()
    requests = [
        LoglikRequest(item.prompt, (item.choices if by_text else ()) + (item.label_targets if by_label else ()))
        for item in items
    ]
    scores = continuation_logliks(model, tokenizer, requests, desc=f"{name} log-likelihood", **options)
    seconds = round(time.perf_counter() - start, 2)
    scored: dict[str, dict[str, Any]] = {}
    if by_text:
        texts = [s[: len(i.choices)] for i, s in zip(items, scores, strict=True)]
        picks = [best(t) for t in texts]
        metrics = _rates(items, picks, seconds)
        norm = _rates(items, [best_per_char(t, i.choices) for i, t in zip(items, texts, strict=True)], seconds)
        metrics.update(acc_norm=norm["acc"], acc_norm_stderr=norm["acc_stderr"], correct_norm=norm["correct"])
        scored["loglik"] = _with_samples(metrics, items, picks, log_samples)
    if by_label:
        picks = [best(s[-len(i.labels) :]) for i, s in zip(items, scores, strict=True)]
        scored["loglik-label"] = _with_samples(_rates(items, picks, seconds), items, picks, log_samples)
    return scored


def _with_samples(metrics: dict[str, Any], items, picks: list[int], log_samples: bool) -> dict[str, Any]:
    if log_samples:
        metrics["samples"] = _samples(items, [i.labels[p] for i, p in zip(items, picks, strict=True)])
    return metrics


def _generate_protocol(model, tokenizer, items, name, max_new_tokens, num_beams, log_samples, options):
    start = time.perf_counter()
    prompts = [i.prompt for i in items]
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        desc=f"{name} generate",
        **options,
    )
    predicted = [extract_answer(r, i.labels) for i, r in zip(items, responses, strict=True)]
    picks = [i.labels.index(p) if p in i.labels else None for i, p in zip(items, predicted, strict=True)]
    metrics = _rates(items, picks, round(time.perf_counter() - start, 2))
    metrics["unparsed"] = sum(p is None for p in predicted)
    if log_samples:
        samples = _samples(items, [p or "" for p in predicted])
        metrics["samples"] = [{**s, "response": r} for s, r in zip(samples, responses, strict=True)]
    return metrics


def best(scores: Sequence[float]) -> int:
    """Index of the highest score (the first on a tie)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def best_per_char(scores: Sequence[float], texts: Sequence[str]) -> int:
    """lm-evaluation-harness's acc_norm choice: the highest log-likelihood per character of the choice text."""
    return best([s / len(t) for s, t in zip(scores, texts, strict=True)])


def average(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean of each rate over the tasks (as papers average), with the total example count."""
    summary: dict[str, Any] = {"tasks": len(per_task), "n": sum(m["n"] for m in per_task.values())}
    for key in AVERAGED:
        if per_task and all(key in m for m in per_task.values()):
            summary[key] = sum(m[key] for m in per_task.values()) / len(per_task)
        if per_task and all(f"{key}_stderr" in m for m in per_task.values()):  # tasks are independent samples
            summary[f"{key}_stderr"] = math.sqrt(sum(m[f"{key}_stderr"] ** 2 for m in per_task.values())) / len(
                per_task
            )
    return summary


def _rates(items: Sequence[CommonsenseItem], picks: Sequence[int | None], seconds: float) -> dict[str, Any]:
    correct, n = sum(int(p == i.gold) for i, p in zip(items, picks, strict=True)), len(items)
    return {"n": n, "correct": correct, "acc": correct / max(n, 1), "acc_stderr": accuracy_stderr(correct, n),
            "seconds": seconds}  # fmt: skip


def _samples(items: Sequence[CommonsenseItem], predicted: Sequence[str]) -> list[dict[str, str]]:
    return [{"source": i.source, "gold": i.answer, "pred": p} for i, p in zip(items, predicted, strict=True)]
