"""How each row of a batch picks its next token: greedy (temperature 0) or temperature / top-p sampling, with a
per-request random generator so a request with a seed gives the same text whatever it is batched with."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation. temperature=0 is greedy (argmax), as `generate(do_sample=False)`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: ask for at least one new token.")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature}: use 0 (greedy) or a positive value such as 0.7.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: use a value in (0, 1]; 1 keeps every token.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The row's own random stream: seeded when the request gives a seed, otherwise from the OS."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63) if seed is None else seed)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row's float32 logits (vocab,) under temperature and nucleus (top-p) sampling."""
    # in float64, max subtracted: a temperature or top_p as small as 1e-300 neither overflows nor rounds to 0
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """The next token of every row of `logits` (rows × vocab): one argmax for the greedy rows, then the samplers."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = sample_row(logits[i], p, generators[i])
    return tokens
