"""The frozen outer basis of one layer: B_o (d×r), A_o (r×k) and the singular values, shared by every adapter
of the same method, rank and SVD settings on that layer."""

from __future__ import annotations

import torch
from torch import nn

from .svd import BASIS_CACHE, SVDSettings, check_finite, fingerprint, place, tensor_digest, truncated_svd


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


def build_basis(
    W: torch.Tensor,
    r: int,
    placement: str,
    settings: SVDSettings,
    key: str,
    digest: str,
    scales: torch.Tensor | None = None,
    cache_dir: str | None = None,
    where: str = "layer",
) -> OuterBasis:
    """SVD of W0 (or of W0·diag(a) for AwSVD, with diag(a)⁻¹ folded back into A_o), through the cache."""
    svd_key = fingerprint(
        kind="svd",
        r=r,
        svd=settings,
        shape=list(W.shape),
        digest=digest,
        scales=None if scales is None else tensor_digest(scales),
    )
    factors = BASIS_CACHE.get(svd_key, cache_dir)
    if factors is None:
        check_finite(W, where)
        target = W if scales is None else W.to(settings.torch_dtype) * scales.to(W.device, settings.torch_dtype)
        U, S, Vh = truncated_svd(target, r, settings)
        factors = {"U": U, "S": S, "Vh": Vh}
        BASIS_CACHE.put(svd_key, factors, cache_dir)
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
