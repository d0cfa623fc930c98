"""FLoRA over rounds (Wang et al. 2024): each round's clients train a fresh LoRA on the global model, the server
stacks their factors (exact: Σ p_i s_i B_i A_i), and the stacked update joins the global one, which every party
holds merged into its base weights (W0 + B·A, W0 kept). The global update travels as factors (`carry`: per layer
B, A with the scale folded into B), of rank Σ over rounds of Σ r_i — re-factored exactly once it passes
min(d, k) — so FLoRA's download grows with clients and rounds, as the paper's does.

Saved after each round as an ordinary LoRA adapter of that rank on the untouched base (per-layer ranks in its
metadata): loading it gives W0 + ΔW_global exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..config import AdapterConfig
from ..io import SAVE_PREFIX
from ..methods import get_method
from ..methods.base import low_rank_split

PREFIX = "flora:"
Carry = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer → (B with the scale folded in, A), float64


def round_update(state: dict[str, torch.Tensor], ranks: dict[str, int], config: AdapterConfig) -> Carry:
    """Each layer's (s·B, A) of a stacked adapter `state` (aggregate's FLoRA result; `ranks` per layer)."""
    method = get_method(config.method)
    return {
        lname: (method.scale(config, r) * state[f"{lname}.lora_B"].double(), state[f"{lname}.lora_A"].double())
        for lname, r in ranks.items()
    }  # fmt: skip


def extend(carry: Carry, update: Carry) -> Carry:
    """The global update plus this round's, stacked; re-factored exactly (SVD) where the rank passes min(d, k)."""
    out = {}
    for lname, (B, A) in update.items():
        if lname in carry:
            B, A = torch.cat([carry[lname][0], B], dim=1), torch.cat([carry[lname][1], A], dim=0)
        if A.shape[0] > min(B.shape[0], A.shape[1]):
            B, A = low_rank_split(B @ A, min(B.shape[0], A.shape[1]))  # ΔW has rank ≤ min(d, k): nothing lost
        out[lname] = (B, A)
    return out


def to_message(carry: Carry) -> dict[str, torch.Tensor]:
    return {
        f"{PREFIX}{lname}.{side}": t.float()
        for lname, pair in carry.items()
        for side, t in zip("BA", pair, strict=True)
    }


def from_message(tensors: dict[str, torch.Tensor]) -> Carry:
    names = sorted({k[len(PREFIX) :].rsplit(".", 1)[0] for k in tensors if k.startswith(PREFIX)})
    return {n: (tensors[f"{PREFIX}{n}.B"].double(), tensors[f"{PREFIX}{n}.A"].double()) for n in names}


def as_adapter(
    carry: Carry, head: dict[str, torch.Tensor], payload: dict[str, Any], config: AdapterConfig, layers: dict
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global model as a LoRA adapter on W0: per layer lora_B = B / s(R), lora_A = A at rank R."""
    method = get_method(config.method)
    payload = copy.deepcopy(payload)
    tensors = dict(head)
    for lname, (B, A) in carry.items():
        r, dtype = A.shape[0], layers[lname].param_dtype()
        tensors[f"{lname}.lora_B"] = (B / method.scale(config, r)).to(dtype).contiguous()
        tensors[f"{lname}.lora_A"] = A.to(dtype).contiguous()
        info = payload["nora"]["layers"][lname]
        info["r"], info["fingerprint"] = r, layers[lname].plan(config, method, r=r).key
    ranks = {A.shape[0] for _, A in carry.values()}
    if len(ranks) == 1:
        payload["r"] = ranks.pop()
    return tensors, payload


def from_adapter(tensors: dict[str, torch.Tensor], meta: dict[str, Any], config: AdapterConfig) -> Carry:
    """The carry of a saved global adapter (as_adapter's inverse)."""
    ranks = {lname: info["r"] for lname, info in meta["layers"].items()}
    return round_update(tensors, ranks, config)


def head_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(SAVE_PREFIX)}
