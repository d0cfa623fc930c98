"""Log-likelihood of continuations given a context (the lm-evaluation-harness protocol), batched.

Tokenisation follows lm-evaluation-harness, so both score the same tokens: the context's trailing whitespace moves
to the continuation, and a continuation's tokens are those of context+continuation after the context's tokens.

Each context runs once and its key/value cache is repeated for its continuations, which then run together. The
padding side is set here, not taken from the tokenizer: contexts are left-padded and every position id is given
explicitly, so a model with absolute positions (GPT-2) scores a request the same in a batch as alone. A context
longer than the model's positions loses its start (as in lm-evaluation-harness); `Truncated` says which did.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AdapterError
from ..pretrained import cache_kwargs, output_cache


@dataclass(frozen=True)
class LoglikRequest:
    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class _Encoded:
    context: list[int]
    continuations: list[list[int]]
    truncated: bool = False


@dataclass
class Truncated:
    """The prompts (indices into one call's list) longer than the model's `context` positions, which lost their
    start to fit. Passed to a scoring call, it is filled and the call stays quiet; without one, the call warns."""

    indices: set[int] = field(default_factory=set)
    context: int = 0

    def record(self, flags: Sequence[bool], context: int) -> None:
        self.indices.update(i for i, cut in enumerate(flags) if cut)
        self.context = context


def report_truncated(flags: Sequence[bool], context: int, into: Truncated | None, what: str) -> None:
    """Fill `into`, or with none given warn of the prompts cut to fit the model's context."""
    if into is not None:
        into.record(flags, context)
    elif any(flags):
        warnings.warn(truncation_message(sum(flags), len(flags), context, what), stacklevel=3)


def truncation_message(count: int, total: int, context: int, what: str, detail: str = "") -> str:
    return (
        f"{count} of {total} {what} prompt(s) were longer than the model's {context}-token context and lost their "
        f"beginning (left-truncated to fit){': ' + detail if detail else ''}."
    )


def continuation_logliks(
    model: nn.Module,
    tokenizer,
    requests: Sequence[LoglikRequest],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "log-likelihood",
    truncated: Truncated | None = None,
) -> list[list[float]]:
    """Sum of log p(continuation token | everything before it) for each continuation of each request.
    `batch_size` counts contexts; a context's continuations share its batch. A context cut to fit the model's
    positions is recorded in `truncated`, or warned of without one."""
    if batch_size < 1:
        raise AdapterError(f"batch_size={batch_size} must be at least 1.")
    limit = max_length or model_max_length(model, tokenizer)
    encoded = [_encode(tokenizer, request, limit) for request in requests]
    report_truncated([e.truncated for e in encoded], limit, truncated, desc)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    results: list[list[float]] = [[] for _ in encoded]
    with inference(model, len(order), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, scores in zip(
                batch, _score_batch(model, [encoded[i] for i in batch], pad_id(tokenizer)), strict=True
            ):
                results[i] = scores
            bar.update(len(batch))
    return results


@contextmanager
def inference(model: nn.Module, total: int, desc: str, progress: bool) -> Iterator[tqdm]:
    """The block runs in eval and inference mode under a progress bar over `total` items; the model's own
    train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
            yield bar
    finally:
        model.train(was_training)


def pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def model_max_length(model: nn.Module, tokenizer) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 2048


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer, request: LoglikRequest, max_length: int) -> _Encoded:
    if not request.continuations:
        raise AdapterError(f"a log-likelihood request has no continuations (context {request.context[:60]!r}…).")
    context = request.context.rstrip()
    moved = request.context[len(context) :]
    context_ids = _ids(tokenizer, context) if context else []
    if not context_ids:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise AdapterError("an empty context needs a BOS or EOS token to condition on; the tokenizer has none.")
        context_ids = [int(prefix)]
        continuations = [_ids(tokenizer, moved + c) for c in request.continuations]
    else:
        continuations = [_ids(tokenizer, context + moved + c)[len(context_ids) :] for c in request.continuations]
    for text, ids in zip(request.continuations, continuations, strict=True):
        if not ids:
            raise AdapterError(f"the continuation {text!r} encodes to no tokens; it cannot be scored.")
    longest = max(len(ids) for ids in continuations)
    if longest >= max_length:
        raise AdapterError(f"a continuation of {longest} tokens does not fit the model's {max_length} positions.")
    room = max_length - longest
    return _Encoded(context_ids[-room:], continuations, len(context_ids) > room)


def _ids(tokenizer, text: str) -> list[int]:
    """The text's token ids; verbose=False: no 'indexing errors' warning for a long text, which is cut here."""
    return list(tokenizer(text, verbose=False)["input_ids"])


def _score_batch(model: nn.Module, batch: list[_Encoded], pad: int) -> list[list[float]]:
    device = model_device(model)
    width = max(len(e.context) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, width - len(e.context) :] = torch.tensor(e.context)
        mask[row, width - len(e.context) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=True
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
    rows = [(b, cont) for b, e in enumerate(batch) for cont in e.continuations]
    scores = [first[b, cont[0]].item() for b, cont in rows]
    tail = max(len(cont) - 1 for _, cont in rows)
    if tail > 0:
        cache = output_cache(out)
        if not hasattr(cache, "reorder_cache"):
            raise AdapterError(
                f"{type(model).__name__} returns no key/value cache object (transformers Cache); nora's "
                "log-likelihood scoring shares each context's cache across its choices and needs one."
            )
        owner = torch.tensor([b for b, _ in rows])
        cache.reorder_cache(owner.to(device))
        inputs = torch.full((len(rows), tail), pad, dtype=torch.long)
        targets = torch.zeros((len(rows), tail), dtype=torch.long)
        valid = torch.zeros((len(rows), tail), dtype=torch.long)
        for r, (_, cont) in enumerate(rows):
            n = len(cont) - 1
            inputs[r, :n], targets[r, :n], valid[r, :n] = torch.tensor(cont[:-1]), torch.tensor(cont[1:]), 1
        positions = mask.sum(-1)[owner, None] + torch.arange(tail)
        logits = model(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([mask[owner], valid], dim=1).to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **cache_kwargs(model, cache),
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device)[..., None])[..., 0]
        sums = (logp.cpu() * valid).sum(-1)
        scores = [s + sums[r].item() for r, s in enumerate(scores)]
    per_request: list[list[float]] = [[] for _ in batch]
    for (b, _), s in zip(rows, scores, strict=True):
        per_request[b].append(s)
    return per_request
