"""The rows being generated now, decoded together: one forward pass per step for every live row, each row with its
own adapter (`adapter_names=`), sampling settings, token budget and stop strings. Used by the engine's worker
thread only.

New requests are prefilled together (left-padded, with an attention mask and per-row position ids) and join the
running rows at the next step; a finished row leaves at once. Greedy rows give exactly the tokens that
`generate(do_sample=False)` gives for that adapter alone.

One adapter's failure is its rows' alone: a row whose logits hold NaN or +inf ends with an error, the others go on;
a step whose forward pass raises is run again adapter by adapter from the cache as it was, the rows of the adapters
that fail alone end with an error, and the others' step is recomputed without them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..layers import BASE
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

    def emit(self, text: str, error: str | None = None, code: str | None = None) -> None:
        if not text and self.finish is None:
            return
        event = Event(
            text=text,
            finish_reason=self.finish,
            token_ids=tuple(self.tokens) if self.finish else (),
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.tokens),
            error=error,
            error_code=(code or "generation_failed") if error else None,
        )
        deliver(self.request, event)


def deliver(request: GenerationRequest, event: Event) -> None:
    try:
        request.sink(event)
    except Exception:  # a listener's failure must not stop the other rows
        log.exception("an event listener failed")


def end_request(request: GenerationRequest, reason: str, error: str | None = None, code: str | None = None) -> None:
    """Finish a request that never got a row (cancelled while waiting, shutdown, failed prefill)."""
    code = (code or "generation_failed") if error else None
    deliver(request, Event(finish_reason=reason, prompt_tokens=len(request.prompt_ids), error=error, error_code=code))


def who(adapter: str) -> str:
    return "the base model" if adapter == BASE else f"adapter {adapter!r}"


def adapter_failed(adapter: str, error: Exception) -> str:
    return (
        f"generation failed for {who(adapter)} ({type(error).__name__}: {error}); this request was stopped, the "
        "other requests batched with it went on."
    )


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
        before = self.mask
        saved = kv_batch.snapshot(self.cache) if self.joinable else None
        try:
            logits = self._forward(model, self.rows, _grown(before))
        except Exception as e:
            if saved is None or len(self.adapters_in_use()) < 2:
                raise  # nothing to tell apart: the loop ends every row
            logits = self._isolate(model, saved, before, e)
        else:
            self.mask = _grown(before)
        for row in self.rows:
            row.position += 1
        self._advance(self.rows, logits)
        self._drop_finished()

    def _forward(self, model: AdaptedModel, rows: list[Row], mask: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None
        ids = torch.tensor([[row.last] for row in rows], device=mask.device)
        positions = torch.tensor([[row.position] for row in rows], device=mask.device)
        return last_logits(model, ids, mask, positions, self.cache, [r.request.adapter for r in rows])

    def _isolate(self, model: AdaptedModel, saved: kv_batch.Snapshot, before: torch.Tensor, error: Exception):
        """After a failed step: run each adapter's rows alone from the cache as it was; end the rows of the adapters
        that fail alone, and recompute the step for the others (their logits are returned)."""
        assert self.cache is not None
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(row.request.adapter, []).append(i)
        failed: dict[str, Exception] = {}
        for adapter, index in groups.items():
            kv_batch.restore(self.cache, saved)
            mask = kv_batch.keep_rows(self.cache, before, index)
            try:
                self._forward(model, [self.rows[i] for i in index], _grown(mask))
            except Exception as e:
                failed[adapter] = e
        kv_batch.restore(self.cache, saved)
        if not failed or len(failed) == len(groups):
            raise error  # no adapter fails alone, or every one does
        for adapter, e in failed.items():
            log.error("decode step failed for %s; its %d row(s) end, the others go on: %s: %s", who(adapter),
                      len(groups[adapter]), type(e).__name__, e, exc_info=e)  # fmt: skip
        keep = [i for i, row in enumerate(self.rows) if row.request.adapter not in failed]
        for row in self.rows:
            if row.request.adapter in failed:
                row.finish = "error"
                row.emit("", adapter_failed(row.request.adapter, failed[row.request.adapter]), "adapter_failed")
        before = kv_batch.keep_rows(self.cache, before, keep)
        self.rows = [self.rows[i] for i in keep]
        self.mask = _grown(before)
        return self._forward(model, self.rows, self.mask)

    # ---- ending rows -----------------------------------------------------------------------------------------
    def end_all(self, reason: str, error: str | None = None, code: str | None = None) -> None:
        """Finish every row now (shutdown, or a failed forward pass) and start afresh."""
        for row in self.rows:
            row.finish = reason
            row.emit("", error, code)
        self.rows, self.cache, self.mask, self.joinable = [], None, None, True

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        broken = (torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)).tolist()
        if any(broken):  # that row's adapter overflowed on its input: it ends, the others pick their tokens
            for row, bad in zip(rows, broken, strict=True):
                if bad:
                    row.finish = "error"
                    row.emit("", f"{who(row.request.adapter)} computed NaN or inf logits for this request (its "
                             "weights overflow on this input); the request was stopped, the others went on.",
                             "adapter_failed")  # fmt: skip
                    log.warning("%s computed non-finite logits; its row ends", who(row.request.adapter))
            good = [i for i, bad in enumerate(broken) if not bad]
            rows, logits = [rows[i] for i in good], logits[good]
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


def _grown(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask with a column for the token fed in this step."""
    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)


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
