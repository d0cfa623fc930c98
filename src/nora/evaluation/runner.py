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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AdapterError
from .classification import accuracy_stderr, classification_metrics, predict_labels, predict_logits, regression_metrics
from .fewshot import (
    FewshotSource,
    PromptStyle,
    draw_shots,
    fewshot_pool_file,
    gold_choice,
    gold_response,
    render,
    require_chat_template,
)
from .generation import generate_responses
from .loglik import LoglikRequest, Truncated, continuation_logliks, truncation_message
from .records import CommonsenseItem, extract_answer
from .tasks import (
    Columns,
    Head,
    TaskSpec,
    load_classification,
    load_commonsense,
    load_commonsense_file,
    missing_suite_tasks,
    resolve_tasks,
)

PROTOCOLS = ("loglik", "loglik-label", "generate")
AVERAGED = ("acc", "acc_norm", "top5_acc", "f1", "macro_f1", "mcc", "pearson", "spearman")


@dataclass(frozen=True)
class PreparedTask:
    """A task read and checked before any model is loaded: its examples (or items), and for a commonsense task
    each item's few-shot examples and the prompt style."""

    spec: TaskSpec
    examples: list[Any]
    shots: list[tuple[CommonsenseItem, ...]] = field(default_factory=list)
    fewshot_file: Path | None = None
    style: PromptStyle = PromptStyle()


def prepare_tasks(
    tasks: Sequence[str | os.PathLike | TaskSpec],
    protocols: Sequence[str] = ("loglik",),
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    head: Head | None = None,
    columns: Columns | None = None,
    style: PromptStyle | None = None,
) -> list[PreparedTask]:
    """Every task resolved, read and checked — records parsed, choice texts found, labels matched, few-shot
    examples drawn — so that whatever can be wrong with the data or the arguments stops before a model loads."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise AdapterError(f"protocols {unknown or '[]'}: choose from {list(PROTOCOLS)}.")
    style = style or PromptStyle()
    prepared = []
    for spec in resolve_tasks(tasks, data_dir, labelled=head is not None):
        if spec.kind == "classification":
            if style.num_fewshot or style.chat_template:
                raise AdapterError(
                    f"{spec.name} is scored by a trained head, which reads no prompt: --num-fewshot and "
                    "--chat-template are options of the commonsense (causal LM) tasks."
                )
            prepared.append(PreparedTask(spec, load_classification(spec, limit, seed, head, columns)))
            continue
        items = load_commonsense(spec, limit, seed)
        shots: list[tuple[CommonsenseItem, ...]] = [() for _ in items]
        pool_file = None
        if style.num_fewshot:
            pool_file = fewshot_pool_file(spec.path, style.fewshot_from)
            shots = draw_shots(items, load_commonsense_file(pool_file), style.num_fewshot, seed)
        if "loglik" in protocols:  # the choice texts are read off each instruction: fail on a bad one now
            for item in [*items, *(shot for drawn in shots for shot in drawn)]:
                item.choices  # noqa: B018
        prepared.append(PreparedTask(spec, items, shots, pool_file, style))
    return prepared


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str | os.PathLike | TaskSpec] | Sequence[PreparedTask],
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
    num_fewshot: int = 0,
    fewshot_from: FewshotSource = "auto",
    chat_template: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate `model` (a transformers model, or a nora AdaptedModel) on `tasks` (names, files, directories, or
    the output of `prepare_tasks`, which then fixes the data arguments).

    Returns {protocol: {"tasks": {task: metrics}, "average": metrics}}, with "classification" (or "regression") as
    the protocol of labelled files. Metrics hold `n` (examples scored), `correct` and the rates; `limit` draws that
    many examples per task with `seed` (the same draw for every protocol and model). `head` is what a trained
    classifier predicts (its label set, or regression: `nora.evaluation.loading.adapter_head`); with it, any
    labelled file is scored, its columns found by name or given as `columns`. `num_fewshot`, `fewshot_from` and
    `chat_template` shape the commonsense prompts (`nora.evaluation.fewshot`). `log_samples` keeps, per example,
    the full prompt, each choice's log-likelihood and the picks. A commonsense task's metrics count the prompts
    cut from the left to fit the model's context (`truncated`, `context`), and one warning sums them over the
    tasks. The model's train/eval mode is restored."""
    if tasks and all(isinstance(t, PreparedTask) for t in tasks):
        prepared = list(tasks)
    else:
        for suite, absent in missing_suite_tasks(tasks, data_dir).items():  # type: ignore[arg-type]
            warnings.warn(f"suite {suite}: no file for {', '.join(absent)} under {data_dir}; evaluating the rest.",
                          stacklevel=2)  # fmt: skip
        style = PromptStyle(num_fewshot, fewshot_from, chat_template)
        prepared = prepare_tasks(tasks, protocols, data_dir=data_dir, limit=limit, seed=seed, head=head,  # type: ignore[arg-type]
                                 columns=columns, style=style)  # fmt: skip
    if chat_template or any(task.style.chat_template for task in prepared):
        require_chat_template(tokenizer)
    options = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    for task in prepared:
        spec = task.spec
        if spec.kind == "classification":
            start = time.perf_counter()
            examples = task.examples
            gold = [e.label for e in examples]
            if head is not None and head.kind.predicts_number:
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
                metrics["samples"] = [{"text": list(e.texts), "gold": g, "pred": p}
                                      for e, g, p in zip(examples, gold, predicted, strict=True)]  # fmt: skip
            results.setdefault(protocol, {})[spec.name] = metrics
            continue
        chat = tokenizer if task.style.chat_template else None
        scored = score_commonsense(model, tokenizer, task.examples, protocols, spec.name, max_new_tokens, num_beams,
                                   log_samples, shots=task.shots, chat=chat, **options)  # fmt: skip
        for protocol, metrics in scored.items():
            if task.style.num_fewshot:
                metrics.update(num_fewshot=task.style.num_fewshot, fewshot_file=str(task.fewshot_file))
            results.setdefault(protocol, {})[spec.name] = metrics
    _warn_truncated(results, prepared)
    return {protocol: {"tasks": per_task, "average": average(per_task)} for protocol, per_task in results.items()}


def _warn_truncated(results: dict[str, dict[str, Any]], prepared: Sequence[PreparedTask]) -> None:
    """One warning for every prompt cut to fit the model's context, over all tasks and protocols."""
    cut = {
        (protocol, task): m for protocol, tasks in results.items() for task, m in tasks.items() if m.get("truncated")
    }
    if not cut:
        return
    count, total = sum(m["truncated"] for m in cut.values()), sum(m["n"] for m in cut.values())
    where = ", ".join(f"{task} {protocol} {m['truncated']}" for (protocol, task), m in cut.items())
    fewshot = any(task.style.num_fewshot for task in prepared)
    message = truncation_message(count, total, next(iter(cut.values()))["context"], "commonsense", where)
    warnings.warn(message + (" Fewer few-shot examples (--num-fewshot) keep them whole." if fewshot else ""),
                  stacklevel=3)  # fmt: skip


def score_commonsense(
    model: nn.Module,
    tokenizer,
    items: Sequence[CommonsenseItem],
    protocols: Sequence[str],
    name: str = "task",
    max_new_tokens: int = 32,
    num_beams: int = 1,
    log_samples: bool = False,
    shots: Sequence[Sequence[CommonsenseItem]] | None = None,
    chat=None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Metrics of one commonsense task under each requested protocol, each item after its `shots` (solved
    examples) and in the chat template of `chat` (a tokenizer) when given. Where both log-likelihood protocols
    see the same prompt (zero-shot) they share one pass over it. Each protocol's metrics count in `truncated` the
    prompts that lost their start to fit the model's `context` positions."""
    shots = shots if shots is not None else [() for _ in items]
    prompts = {
        kind: [render(item, drawn, answer, chat) for item, drawn in zip(items, shots, strict=True)]
        for kind, answer in (("choice", gold_choice), ("response", gold_response))
        if kind == "response" or "loglik" in protocols
    }
    scored: dict[str, dict[str, Any]] = {}
    if {"loglik", "loglik-label"} & set(protocols):
        scored.update(_loglik_protocols(model, tokenizer, items, protocols, prompts, name, log_samples, options))
    if "generate" in protocols:
        scored["generate"] = _generate_protocol(
            model, tokenizer, items, prompts["response"], name, max_new_tokens, num_beams, log_samples, options
        )
    return scored


def _loglik_protocols(model, tokenizer, items, protocols, prompts, name, log_samples, options):
    by_text, by_label = "loglik" in protocols, "loglik-label" in protocols
    start = time.perf_counter()
    requests: list[LoglikRequest] = []
    where: dict[tuple[str, int], tuple[int, int]] = {}  # (protocol, item) → (request, first continuation)
    for i, item in enumerate(items):
        wanted = [(protocol, prompts[kind][i], targets) for protocol, kind, targets, on in (
            ("loglik", "choice", item.choices if by_text else (), by_text),
            ("loglik-label", "response", item.label_targets, by_label)) if on]  # fmt: skip
        if len(wanted) == 2 and wanted[0][1] == wanted[1][1]:  # both protocols see one prompt: one request
            where[(wanted[0][0], i)], where[(wanted[1][0], i)] = (len(requests), 0), (len(requests), len(wanted[0][2]))
            requests.append(LoglikRequest(wanted[0][1], tuple(wanted[0][2]) + tuple(wanted[1][2])))
            continue
        for protocol, context, targets in wanted:
            where[(protocol, i)] = (len(requests), 0)
            requests.append(LoglikRequest(context, tuple(targets)))
    cut = Truncated()
    scores = continuation_logliks(model, tokenizer, requests, desc=f"{name} log-likelihood", truncated=cut, **options)
    seconds = round(time.perf_counter() - start, 2)

    def truncated(protocol: str) -> dict[str, int]:
        return {"truncated": sum(where[(protocol, i)][0] in cut.indices for i in range(len(items))),
                "context": cut.context}  # fmt: skip

    def logliks(protocol: str, i: int, count: int) -> list[float]:
        request, first = where[(protocol, i)]
        return scores[request][first : first + count]

    scored: dict[str, dict[str, Any]] = {}
    if by_text:
        texts = [logliks("loglik", i, len(item.choices)) for i, item in enumerate(items)]
        picks = [best(t) for t in texts]
        norm_picks = [best_per_char(t, i.choices) for i, t in zip(items, texts, strict=True)]
        metrics = _rates(items, picks, seconds)
        norm = _rates(items, norm_picks, seconds)
        metrics.update(acc_norm=norm["acc"], acc_norm_stderr=norm["acc_stderr"], correct_norm=norm["correct"])
        metrics.update(truncated("loglik"))
        if log_samples:
            metrics["samples"] = [
                {**_sample(item, item.labels[p], prompt, p), "choices": list(item.choices), "logliks": t,
                 "pred_norm": item.labels[q], "acc_norm": int(q == item.gold)}
                for item, prompt, t, p, q in zip(items, prompts["choice"], texts, picks, norm_picks, strict=True)
            ]  # fmt: skip
        scored["loglik"] = metrics
    if by_label:
        labelled = [logliks("loglik-label", i, len(item.labels)) for i, item in enumerate(items)]
        picks = [best(t) for t in labelled]
        metrics = _rates(items, picks, seconds) | truncated("loglik-label")
        if log_samples:
            metrics["samples"] = [
                {**_sample(item, item.labels[p], prompt, p), "targets": list(item.label_targets), "logliks": t}
                for item, prompt, t, p in zip(items, prompts["response"], labelled, picks, strict=True)
            ]  # fmt: skip
        scored["loglik-label"] = metrics
    return scored


def _generate_protocol(model, tokenizer, items, prompts, name, max_new_tokens, num_beams, log_samples, options):
    start = time.perf_counter()
    cut = Truncated()
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        desc=f"{name} generate",
        truncated=cut,
        **options,
    )
    predicted = [extract_answer(r, i.labels) for i, r in zip(items, responses, strict=True)]
    picks = [i.labels.index(p) if p in i.labels else None for i, p in zip(items, predicted, strict=True)]
    metrics = _rates(items, picks, round(time.perf_counter() - start, 2))
    metrics.update(unparsed=sum(p is None for p in predicted), truncated=len(cut.indices), context=cut.context)
    if log_samples:
        metrics["samples"] = [
            {**_sample(item, label or "", prompt, pick), "response": response}
            for item, prompt, label, pick, response in zip(items, prompts, predicted, picks, responses, strict=True)
        ]
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


def _sample(item: CommonsenseItem, predicted: str, prompt: str, pick: int | None) -> dict[str, Any]:
    return {"source": item.source, "gold": item.answer, "pred": predicted, "acc": int(pick == item.gold),
            "prompt": prompt}  # fmt: skip
