"""Batched generation for the LLM-Adapters protocol: greedy (or beam) decoding of each prompt's response.

Decoder-only models continue the last token of a row, so prompts are left-padded here whatever the tokenizer's
padding side, and only the new tokens are decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from ..errors import AdapterError
from .loglik import Truncated, inference, model_device, model_max_length, pad_id, report_truncated


def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "generate",
    truncated: Truncated | None = None,
) -> list[str]:
    """The decoded response (new tokens only, special tokens dropped) to each prompt, in order. A prompt cut to
    leave room for the response in the model's positions is recorded in `truncated`, or warned of without one."""
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise AdapterError(
            f"batch_size={batch_size}, max_new_tokens={max_new_tokens} and num_beams={num_beams} must be at least 1."
        )
    room = (max_length or model_max_length(model, tokenizer)) - max_new_tokens
    if room < 1:
        raise AdapterError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's positions.")
    whole = [list(tokenizer(p, verbose=False)["input_ids"]) for p in prompts]  # cut below: no 'indexing errors'
    report_truncated([len(ids) > room for ids in whole], room + max_new_tokens, truncated, desc)
    encoded = [ids[-room:] for ids in whole]
    config = _greedy_config(model, tokenizer, max_new_tokens, num_beams)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    responses = [""] * len(encoded)
    device = model_device(model)
    with inference(model, len(order), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                responses[i] = text
            bar.update(len(batch))
    return responses


def _greedy_config(model: nn.Module, tokenizer, max_new_tokens: int, num_beams: int) -> GenerationConfig:
    model_config = getattr(model, "generation_config", None)
    eos = getattr(model_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad_id(tokenizer),
    )
