"""The rows being generated now, decoded together: one forward pass per step for every live row, each row with its
own adapter (`adapter_names=`), sampling settings, token budget and stop strings. Used by the engine's worker
thread only.

New requests are prefilled together (left-padded, with an attention mask and per-row position ids) and join the
running rows at the next step; a finished row leaves at once. Greedy rows give exactly the tokens that
`generate(do_sample=False)` gives for that adapter alone.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..model import AdaptedModel
from ..pretrained import cache_kwargs
from . import kv_batch
from .events import Event, GenerationRequest
from .sampling import choose_tokens, make_generator
from .text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    stream: TextStream
    generator: torch.Generator
    position: int  # position id of `last`, the token to feed next
    last: int = -1
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None

    def emit(self, text: str, error: str | None = None) -> None:
        if not text and self.finish is None:
            return
        event = Event(
            text=text,
            finish_reason=self.finish,
            token_ids=tuple(self.tokens) if self.finish else (),
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.tokens),
            error=error,
        )
        deliver(self.request, event)


def deliver(request: GenerationRequest, event: Event) -> None:
    try:
        request.sink(event)
    except Exception:  # a listener's failure must not stop the other rows
        log.exception("an event listener failed")


def end_request(request: GenerationRequest, reason: str, error: str | None = None) -> None:
    """Finish a request that never got a row (cancelled while waiting, shutdown, failed prefill)."""
    deliver(request, Event(finish_reason=reason, prompt_tokens=len(request.prompt_ids), error=error))


def hf_model(model: AdaptedModel) -> nn.Module:
    return model.model


class DecodeBatch:
    def __init__(self, tokenizer: Any, eos_ids: set[int], pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.joinable = True

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self) -> bool:
        """Whether new rows can join now (always, unless the running cache cannot be reshaped)."""
        return not self.rows or self.joinable

    def adapters_in_use(self) -> set[str]:
        return {row.request.adapter for row in self.rows}

    # ---- the two kinds of step -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: AdaptedModel, requests: list[GenerationRequest]) -> None:
        """Run the prompts of `requests`, pick each one's first token, and add them to the running rows."""
        device = next(model.parameters()).device
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=hf_model(model).config)
        logits = last_logits(model, ids, mask, positions, cache, [r.adapter for r in requests])
        rows = [
            Row(
                r,
                TextStream(self.tokenizer, r.params.stop, r.prompt_ids),
                make_generator(r.params.seed, device),
                position=len(r.prompt_ids),
            )
            for r in requests
        ]
        if self.rows:
            assert self.cache is not None and self.mask is not None
            self.mask = kv_batch.join(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask, self.joinable = cache, mask, kv_batch.reshapeable(cache)
        self.rows += rows
        self._advance(rows, logits)
        self._drop_finished()

    @torch.no_grad()
    def step(self, model: AdaptedModel) -> None:
        """Feed every row its last token and pick the next."""
        assert self.cache is not None and self.mask is not None
        device = self.mask.device
        ids = torch.tensor([[row.last] for row in self.rows], device=device)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = last_logits(model, ids, self.mask, positions, self.cache, [r.request.adapter for r in self.rows])
        for row in self.rows:
            row.position += 1
        self._advance(self.rows, logits)
        self._drop_finished()

    # ---- ending rows -----------------------------------------------------------------------------------------
    def end_all(self, reason: str, error: str | None = None) -> None:
        """Finish every row now (shutdown, or a failed forward pass) and start afresh."""
        for row in self.rows:
            row.finish = reason
            row.emit("", error)
        self.rows, self.cache, self.mask, self.joinable = [], None, None, True

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        tokens = choose_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows])
        for row, token in zip(rows, tokens, strict=True):
            if row.request.cancelled:
                row.finish = "abort"
                row.emit("")
                continue
            if token in self.eos_ids:
                row.finish = "stop"
                row.emit(row.stream.finish())
                continue
            row.tokens.append(token)
            row.last = token
            text = row.stream.push(token)
            if row.stream.stopped:
                row.finish = "stop"
            elif len(row.tokens) >= row.request.params.max_tokens:
                row.finish = "length"
                text += row.stream.finish()
            row.emit(text)

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.joinable = [], None, None, True
            return
        assert self.cache is not None and self.mask is not None
        self.mask = kv_batch.keep_rows(self.cache, self.mask, keep)
        self.rows = [self.rows[i] for i in keep]


_KEEPS_LOGITS: dict[type, bool] = {}


def last_logits(
    model: AdaptedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
    adapters: list[str],
) -> torch.Tensor:
    """The logits of each row's last position (rows × vocab), each row under its own adapter."""
    base = hf_model(model)
    kwargs: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(base, cache)
    )
    cls = type(base)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(base.forward).parameters
    if _KEEPS_LOGITS[cls]:
        kwargs["logits_to_keep"] = 1  # the prompt's other positions need no logits
    kwargs["adapter_names"] = adapters
    return model(**kwargs).logits[:, -1, :]
