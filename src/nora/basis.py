"""The frozen outer basis of one layer: B_o (d×r), A_o (r×k) and the singular values, shared by every adapter
of the same method, rank and SVD settings on that layer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .svd import (
    BASIS_CACHE,
    SVDSettings,
    check_finite,
    fingerprint,
    one_thread,
    place,
    tensor_digest,
    truncated_svd,
)

_PROGRESS_DELAY = 1.0  # seconds: an initialisation still running after this shows a progress bar (on a terminal)
_BATCH_BYTES = int(os.environ.get("NORA_SVD_BATCH_MB", "1024")) << 20


class OuterBasis(nn.Module):
    def __init__(
        self, B: torch.Tensor, A: torch.Tensor, S: torch.Tensor, key: str, scales: torch.Tensor | None
    ) -> None:
        super().__init__()
        # Non-persistent: recomputable from W0, so they travel with .to() but stay out of state_dicts.
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("S", S, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.key = key

    @property
    def r(self) -> int:
        return self.S.shape[0]


def basis_fingerprint(
    method: str, r: int, placement: str, settings: SVDSettings, shape, digest: str, scales: torch.Tensor | None
) -> str:
    return fingerprint(
        method=method,
        r=r,
        placement=placement,
        svd=settings,
        shape=list(shape),
        digest=digest,
        scales=None if scales is None else tensor_digest(scales),
    )


def svd_key(r: int, settings: SVDSettings, shape, digest: str, scales: torch.Tensor | None) -> str:
    """Key of the SVD itself (before placement), shared by every method that needs the same factors."""
    return fingerprint(
        kind="svd",
        r=r,
        svd=settings,
        shape=list(shape),
        digest=digest,
        scales=None if scales is None else tensor_digest(scales),
    )


@dataclass
class SVDRequest:
    key: str
    W: torch.Tensor  # the weight, d × k
    r: int
    scales: torch.Tensor | None
    where: str


def compute_factors(
    requests: list[SVDRequest], settings: SVDSettings, cache_dir: str | None = None, desc: str = "SVD bases"
) -> dict[str, dict[str, torch.Tensor]]:
    """Factors for every request: from the cache where present, else computed. On the CPU one matrix per solve
    (truncated_svd runs it on one thread), so the bar moves per matrix; on other devices equal shapes are stacked
    into one batched solve, chunked to bound memory. A stacked matrix gets the same factors as a lone one."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    todo: dict[tuple, list[SVDRequest]] = {}
    for req in requests:
        if req.key in out:
            continue
        d, k = req.W.shape
        shapes = {"U": (d, req.r), "S": (req.r,), "Vh": (req.r, k)}
        cached = BASIS_CACHE.get(req.key, cache_dir, (shapes, settings.torch_dtype))
        if cached is not None:
            out[req.key] = cached
        else:
            group = (tuple(req.W.shape), req.r, req.W.device, req.W.dtype)
            todo.setdefault(group, []).append(req)
            out[req.key] = {}  # placeholder so duplicates are solved once
    total = sum(len(g) for g in todo.values())
    bar = tqdm(total=total, desc=desc, unit="matrix", delay=_PROGRESS_DELAY, disable=None, leave=False)
    with bar, one_thread():
        for (shape, r, device, _), reqs in todo.items():
            per_matrix = shape[0] * shape[1] * settings.torch_dtype.itemsize * 3
            chunk = 1 if device.type == "cpu" else max(1, _BATCH_BYTES // per_matrix)
            for i in range(0, len(reqs), chunk):
                part = reqs[i : i + chunk]
                for req in part:
                    check_finite(req.W, req.where)
                if len(part) == 1:
                    U, S, Vh = (t.unsqueeze(0) for t in truncated_svd(_target(part[0], settings), r, settings))
                else:
                    U, S, Vh = truncated_svd(torch.stack([_target(req, settings) for req in part]), r, settings)
                for j, req in enumerate(part):
                    factors = {"U": U[j], "S": S[j], "Vh": Vh[j]}
                    BASIS_CACHE.put(req.key, factors, cache_dir)
                    out[req.key] = factors
                bar.update(len(part))
    return out


def _target(req: SVDRequest, settings: SVDSettings) -> torch.Tensor:
    W = req.W.detach().to(settings.torch_dtype)
    return W if req.scales is None else W * req.scales.to(W.device, W.dtype)


def make_basis(
    W: torch.Tensor, factors: dict[str, torch.Tensor], placement: str, key: str, scales: torch.Tensor | None
) -> OuterBasis:
    """Place the singular values; for AwSVD (factors of W0·diag(a)) fold diag(a)⁻¹ back into A_o. On one thread:
    these small elementwise products are exact per element, and on 2 threads of a busy machine took 5-9 ms per
    layer against 0.3 ms."""
    with one_thread():
        U, S, Vh = (factors[k].to(W.device) for k in ("U", "S", "Vh"))
        B, A = place(U, S, Vh, placement)
        if scales is not None:
            A = A / scales.to(A.device, A.dtype)
        store = W.dtype if W.dtype.is_floating_point else torch.float32
        return OuterBasis(
            B.to(store).contiguous(),
            A.to(store).contiguous(),
            S.to(torch.promote_types(store, torch.float32)),
            key,
            None if scales is None else scales.detach().float().to(W.device),
        )
