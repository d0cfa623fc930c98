"""The aggregation rules: how N clients' tensors of one layer become the global adapter's, weighted by p_i
(Σ p_i = 1), and whether the result's ΔW is exactly Σ p_i ΔW_i.

    mean       LoRA-XS, SVFit (and head-only): weighted mean of the r×r cores / singular values. Exact: every client
               shares the frozen SVD basis, so Σ p_i U C_i Vᵀ = U (Σ p_i C_i) Vᵀ. Clients of lower rank are
               zero-padded inside the nested basis (their basis is the top-r of the same SVD): exact too.
    product    NoRA: the inner products C_i = B_in·A_in (r×r) averaged exactly, then re-factored to the inner rank
               r' by truncated SVD. Exact when the average has rank ≤ r'; otherwise the error is the discarded tail.
    frozen-a   NoRA with A_in frozen and shared by every client (FFA-style): the mean of B_in is exact.
    fedavg     LoRA, PiSSA, DoRA: mean of A and mean of B (and DoRA's magnitude). Inexact: mean(B)·mean(A) is
               not mean(B·A); the error is measured and reported.
    ffa        LoRA, PiSSA: A frozen and shared (FFA-LoRA), so the mean of B is exact.
    flora      LoRA: the clients' factors stacked (FLoRA). Exact, but the rank grows to Σ r_i, and so does the
               global adapter's: it is returned with that rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..basis import OuterBasis
from ..chain import chain_product
from ..config import AdapterConfig
from ..errors import AdapterError
from ..methods import CoreView, Method
from ..methods.base import low_rank_split


@dataclass
class ClientLayer:
    """One client's tensors of one layer (float64), its rank and its config."""

    name: str
    tensors: dict[str, torch.Tensor]
    r: int
    config: AdapterConfig


@dataclass
class LayerJob:
    """What a rule combines on one layer: the global adapter's method, config and rank R, the layer's frozen basis
    at rank R (float64; None for a method without one), and the clients with their weights p (summing to 1)."""

    lname: str
    method: Method
    config: AdapterConfig
    R: int
    basis: OuterBasis | None
    clients: list[ClientLayer]
    p: list[float]
    W0: torch.Tensor  # the layer's base weight (float64): DoRA's ΔW depends on it


@dataclass
class Combined:
    tensors: dict[str, torch.Tensor]
    r: int
    truncated: bool = False  # a re-factor dropped part of the averaged update (NoRA "product")


@dataclass(frozen=True)
class Rule:
    name: str
    exact: bool  # whether the rule's global ΔW is Σ p_i ΔW_i (NoRA "product": unless the re-factor truncates)
    combine: Callable[[LayerJob], Combined]
    frozen: tuple[str, ...] = ()  # tensors shared and frozen across clients: never sent by a client
    heterogeneous: bool = False  # whether clients may hold ranks other than the global adapter's
    note: str = ""


def sliced_basis(basis: OuterBasis, r: int) -> OuterBasis:
    """The rank-r basis nested in a rank-R one: the top r singular directions of the same SVD."""
    return OuterBasis(basis.B[:, :r], basis.A[:r], basis.S[:r], basis.key, basis.scales)


def weighted(job: LayerJob) -> zip:
    """(p_i, client i) pairs."""
    return zip(job.p, job.clients, strict=True)


def _scale(job: LayerJob, client: ClientLayer) -> float:
    return job.method.scale(client.config, client.r)


def _weighted(job: LayerJob, key: str) -> torch.Tensor:
    return sum(p * c.tensors[key] for p, c in weighted(job))  # type: ignore[return-value]


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _mean_core(job: LayerJob) -> Combined:
    """LoRA-XS: Σ p_i (s_i/s) C_i, each C_i zero-padded to R×R (its rank-r_i basis is the top of the rank-R one)."""
    s = job.method.scale(job.config, job.R)
    core = sum(p * (_scale(job, c) / s) * _pad(c.tensors["core"], (job.R, job.R)) for p, c in weighted(job))
    return Combined({"core": core}, job.R)  # type: ignore[dict-item]


def _mean_sigma(job: LayerJob) -> Combined:
    """SVFit: ΔW_i = U (σ_i − S) Vᵀ; a rank-r_i client leaves S[r_i:] untouched, i.e. σ padded with S[r_i:]."""
    S = job.basis.S
    sigma = sum(p * torch.cat([c.tensors["sigma"], S[c.r :]]) for p, c in weighted(job))
    return Combined({"sigma": sigma}, job.R)  # type: ignore[dict-item]


def _inner_product(job: LayerJob, client: ClientLayer) -> torch.Tensor:
    """s_i · C_i, C_i the client's inner core multiplied out through the method's own terms (nora.chain)."""
    core = CoreView(client.tensors, _scale(job, client), client.config)
    (term,) = job.method.terms(core, sliced_basis(job.basis, client.r))
    return term.coef * chain_product(term.core)


def _product(job: LayerJob) -> Combined:
    """NoRA: C̄ = Σ p_i (s_i/s) C_i exactly, then the best rank-r' factors of C̄ in the config's inner form."""
    s = job.method.scale(job.config, job.R)
    width = job.R if job.config.inner == "serial" else job.basis.B.shape[0]
    mean = sum(p * _pad(_inner_product(job, c), (width, job.R if job.config.inner == "serial" else width))
               for p, c in weighted(job)) / s  # fmt: skip
    q = job.method.inner_rank(job.config, job.R)
    truncated = int(torch.linalg.matrix_rank(mean)) > q
    if job.config.inner_core == "diag":
        U, S, Vh = torch.linalg.svd(mean, full_matrices=False)
        return Combined({"inner_RA": U[:, :q], "inner_lambda": S[:q], "inner_RB": Vh[:q]}, job.R, truncated)
    B, A = low_rank_split(mean, q)
    return Combined({"inner_B": B, "inner_A": A}, job.R, truncated)


def _shared(job: LayerJob, key: str) -> torch.Tensor:
    """The frozen factor `key`, refused unless every client holds the same one."""
    first = job.clients[0]
    for c in job.clients[1:]:
        if not torch.equal(c.tensors[key], first.tensors[key]):
            raise AdapterError(
                f"layer {job.lname!r}: {key} of client {c.name!r} differs from that of client {first.name!r}, but "
                f"this rule keeps {key} frozen and shared by every client (start each client from the global "
                f"adapter and freeze {key}), or choose another rule."
            )
    return first.tensors[key]


def _frozen(frozen: str, averaged: str, *extra: str) -> Callable[[LayerJob], Combined]:
    def combine(job: LayerJob) -> Combined:
        out = {frozen: _shared(job, frozen), averaged: _weighted(job, averaged)}
        out.update({key: _weighted(job, key) for key in extra})
        return Combined(out, job.R)

    return combine


def _fedavg(job: LayerJob) -> Combined:
    return Combined({key: _weighted(job, key) for key in job.clients[0].tensors}, job.R)


def _flora(job: LayerJob) -> Combined:
    """ΔW = Σ p_i s_i B_i A_i = s_new · [p_i (s_i/s_new) B_i]_i · [A_i]_i with the stacked rank Σ r_i."""
    rank = sum(c.r for c in job.clients)
    s_new = job.method.scale(job.config, rank)
    B = torch.cat([p * (_scale(job, c) / s_new) * c.tensors["lora_B"] for p, c in weighted(job)], dim=1)
    A = torch.cat([c.tensors["lora_A"] for c in job.clients], dim=0)
    return Combined({"lora_A": A, "lora_B": B}, rank)


MEAN = Rule("mean", True, _mean_core, heterogeneous=True)
RULES: dict[str, dict[str, Rule]] = {
    "lora-xs": {"mean": MEAN},
    "svfit": {"mean": Rule("mean", True, _mean_sigma, heterogeneous=True)},
    "head-only": {"mean": Rule("mean", True, _fedavg)},
    "nora": {
        "product": Rule(
            "product",
            True,
            _product,
            heterogeneous=True,
            note="exact when the averaged inner core's rank ≤ the inner rank r', else truncated",
        ),
        "frozen-a": Rule("frozen-a", True, _frozen("inner_A", "inner_B"), frozen=("inner_A",)),
    },  # fmt: skip
    "lora": {
        "fedavg": Rule("fedavg", False, _fedavg, note="mean(B)·mean(A) ≠ mean(B·A): inexact"),
        "ffa": Rule("ffa", True, _frozen("lora_A", "lora_B"), frozen=("lora_A",)),
        "flora": Rule("flora", True, _flora, heterogeneous=True, note="the global rank grows to Σ r_i"),
    },
    "pissa": {
        "fedavg": Rule("fedavg", False, _fedavg, note="mean(B)·mean(A) ≠ mean(B·A): inexact"),
        "ffa": Rule("ffa", True, _frozen("lora_A", "lora_B"), frozen=("lora_A",)),
    },
    "dora": {"fedavg": Rule("fedavg", False, _fedavg, note="DoRA's update is not linear in its tensors: inexact")},
}
DEFAULT_RULE = {"lora-xs": "mean", "svfit": "mean", "head-only": "mean"}  # the methods exact without a choice
