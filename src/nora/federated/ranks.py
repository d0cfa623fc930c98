"""Clients of lower rank than the global adapter (`--client-ranks`): a rank-r client trains the leading r × r block
of the global LoRA-XS core (or the top r singular values, SVFit), in the top-r basis of the same SVD.

    server → client   narrow: the global adapter's leading block, rescaled to the client's rank
    client → server   widen:  the global adapter with that block replaced by what the client trained

Every widened update is a rank-R adapter, so the rule's mean over them is exact: the global ΔW is Σ p_i ΔW̃_i, each
ΔW̃_i the global ΔW with client i's trained block in place (what the client did not train, it leaves as it was,
instead of pulling it towards zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..config import AdapterConfig
from ..io import SAVE_PREFIX
from ..training.config import TrainConfig
from .participant import FederatedError, Participant

# method → the one tensor a layer's rank sizes, and its number of rank-sized dimensions
RANKED = {"lora-xs": ("core", 2), "svfit": ("sigma", 1)}


def check_client_ranks(train: TrainConfig, ranks: list[int], clients: int) -> None:
    """Refuse, before anything loads, per-client ranks this run cannot use."""
    if train.method not in RANKED:
        raise FederatedError(
            f"--client-ranks: a {train.method} client of lower rank cannot be widened exactly into the global "
            f"adapter; per-client ranks are for {sorted(RANKED)} (rule mean). Leave --client-ranks out."
        )
    R = train.adapter_config().r
    if isinstance(R, bool) or not isinstance(R, int):
        raise FederatedError(f"--client-ranks needs a whole-number global rank (--rank), not r={R!r}.")
    if len(ranks) != clients:
        raise FederatedError(f"--client-ranks gives {len(ranks)} ranks for {clients} clients: give one per client.")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= R:
            raise FederatedError(
                f"--client-ranks: client {i} has rank {r!r}; each rank is a whole number from 1 to the global "
                f"adapter's r = {R} (the global adapter holds every client's basis)."
            )


def at_rank(train: TrainConfig, r: int) -> TrainConfig:
    return replace(train, adapter={**train.adapter, "r": r})


def _scaled(config: AdapterConfig, method: str, r: int, R: int) -> float:
    """s(r)/s(R): a rank-r core C stands for (s(r)/s(R))·C in the rank-R core (SVFit has no scale)."""
    return 1.0 if method == "svfit" else config.scale(r) / config.scale(R)


def _map(state: dict[str, torch.Tensor], method: str, fn: Callable[[str, torch.Tensor], torch.Tensor]):
    pname, _ = RANKED[method]
    return {k: (fn(k, v) if not k.startswith(SAVE_PREFIX) and k.rsplit(".", 1)[-1] == pname else v)
            for k, v in state.items()}  # fmt: skip


def narrow(state: dict[str, torch.Tensor], method: str, config: AdapterConfig, r: int) -> dict[str, torch.Tensor]:
    """The global adapter's tensors as a rank-`r` client starts from them: each layer's leading block."""
    dims = RANKED[method][1]

    def block(_: str, t: torch.Tensor) -> torch.Tensor:
        R = t.shape[0]
        rl = min(r, R)
        return (t.detach()[(slice(0, rl),) * dims].double() / _scaled(config, method, rl, R)).to(t.dtype).contiguous()

    return _map(state, method, block)


def widen(
    tensors: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], method: str, config: AdapterConfig
) -> dict[str, torch.Tensor]:
    """A lower-rank client's tensors as a rank-R update: the global tensors with its block in place."""
    dims = RANKED[method][1]

    def put(key: str, t: torch.Tensor) -> torch.Tensor:
        out = global_state[key].detach().clone()
        R, rl = out.shape[0], t.shape[0]
        if rl > R or tuple(t.shape) != (rl,) * dims:
            raise FederatedError(f"{key}: a client sent shape {list(t.shape)}; the global tensor is {list(out.shape)}.")
        out[(slice(0, rl),) * dims] = (t.detach().double() * _scaled(config, method, rl, R)).to(out.dtype)
        return out

    return _map(tensors, method, put)


def check_nested(server: Participant, client: Participant, r: int) -> None:
    """Refuse a rank-`r` party whose basis is not the top r of the server's (a randomized SVD at some shape)."""
    theirs = client.adapted.layers()
    for lname, layer in server.adapted.layers().items():
        big = layer.basis_of(layer.core("default"))
        other = theirs[lname]
        small = other.basis_of(other.core("default"))
        if big is None or small is None:
            continue
        rl = small.B.shape[1]
        if not (torch.allclose(small.B, big.B[:, :rl], atol=1e-6) and torch.allclose(small.A, big.A[:rl], atol=1e-6)):
            raise FederatedError(
                f"--client-ranks: layer {lname!r}'s rank-{r} basis is not the top {r} directions of its rank-"
                f"{big.B.shape[1]} basis (its SVD is randomized at this shape): set the adapter's svd='exact', or "
                "give every client the global rank."
            )
