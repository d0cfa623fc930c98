"""A causal-LM loss that never holds the whole [tokens × vocabulary] logits: the head and cross-entropy run one
chunk of tokens at a time, each chunk's logits recomputed in backward, so only the hidden states are kept.

The value is transformers' own (ForCausalLMLoss): labels shifted left, logits in float32, the summed cross-entropy
divided by the number of targets (the non-ignored labels, or `num_items` where a step divides by a global count).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import AdapterError
from .lean import model_type, wrapped_levels

DEFAULT_CHUNK_TOKENS = 1024
_CHUNK_BYTES = 1 << 28  # auto: a chunk's float32 logits take at most 256 MiB
_SETTING = "_nora_loss_chunk_tokens"
# transformers families whose causal-LM forward is lm_head(hidden), then at most a final logit soft-cap
CHUNKABLE = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3"}
)


def _chunk_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, ignore_index: int
) -> torch.Tensor:
    logits = head(hidden)
    if softcap is not None:  # Gemma 2's final logit soft-cap, as its forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision in float32, as transformers
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = -100,
    num_items: int | torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `hidden` [batch, seq, width] (the decoder's final hidden states) under `head` (the LM
    head, adapted or not) against `labels` [batch, seq] (unshifted, as given to a transformers model), computed
    `chunk_tokens` predicted tokens at a time: the summed cross-entropy divided by `num_items` (default: the count
    of targets that are not `ignore_index`, transformers' mean). `softcap`: a final logit soft-cap (Gemma 2)."""
    if chunk_tokens < 1:
        raise AdapterError(f"chunk_tokens={chunk_tokens} must be at least 1 (0 means the stock loss: call the model).")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise AdapterError(
            f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match: hidden must be "
            "[batch, seq, width] and labels [batch, seq]."
        )
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    kept = (targets != ignore_index).nonzero().squeeze(-1)  # ignored positions add nothing: skip their logits
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, kept)
    targets = targets.index_select(0, kept)
    count = num_items if num_items is not None else kept.numel()
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, states.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (head, states[part], targets[part], softcap, ignore_index)
        if torch.is_grad_enabled() and (states.requires_grad or _trains(head)):
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    if states.shape[0] == 0:  # no target: transformers' mean is 0/0 (nan); still a graph for backward
        total = total + hidden.sum() * 0.0
    return total / count


def _trains(head: nn.Module | Callable) -> bool:
    return isinstance(head, nn.Module) and any(p.requires_grad for p in head.parameters())


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for `vocab_size`: float32 logits of at most 256 MiB, between 64 and 4096 tokens."""
    return max(64, min(4096, _CHUNK_BYTES // (4 * max(vocab_size, 1))))


def set_loss_chunking(model: nn.Module, chunk_tokens: int | None) -> None:
    """Have the causal-LM task compute `model`'s loss `chunk_tokens` tokens at a time (None: auto, 0: the model's
    own loss)."""
    object.__setattr__(model, _SETTING, chunk_tokens)


def causal_lm_chunked_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], num_items: int | torch.Tensor
) -> tuple[torch.Tensor, object] | None:
    """The causal-LM loss of `batch` through `model` with the chunked head (and the model's output, its logits
    empty), or None where the model's own loss is to be used: chunking is off or not set, the family is not one
    whose head nora knows, the model is compiled, or its loss adds a router term."""
    levels = list(wrapped_levels(model))
    setting = next((lv.__dict__[_SETTING] for lv in levels if _SETTING in lv.__dict__), 0)
    hf = next((lv for lv in levels if hasattr(lv, "get_decoder") and hasattr(lv, "lm_head")), None)
    if setting == 0 or hf is None or model_type(hf) not in CHUNKABLE or hasattr(model, "_orig_mod"):
        return None
    if getattr(hf.config, "output_router_logits", False) or "labels" not in batch:
        return None
    chunk = setting or auto_chunk_tokens(int(getattr(hf.config, "vocab_size", 0) or 0))
    captured: list[torch.Tensor] = []
    handle = hf.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        output = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["labels"].device))
    finally:
        handle.remove()
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    loss = chunked_causal_lm_loss(
        captured[-1], hf.lm_head, batch["labels"], chunk, num_items=num_items, softcap=softcap
    )
    return loss, output
