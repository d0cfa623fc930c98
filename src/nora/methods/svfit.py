"""SVFit (arXiv 2409.05926): train only the top-r singular values σ of W0 = U_r Σ_r V_rᵀ + W_e.

The forward W_e x + U_r (σ ⊙ V_rᵀ x) is computed as W0 x + U_r ((σ − Σ_r) ⊙ V_rᵀ x): the same in real arithmetic,
exactly W0 at init, and it keeps the base weight shared and untouched. The rank is fixed, or per matrix the
smallest r keeping `energy` of the spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..chain import Term
from ..config import AdapterConfig
from ..errors import AdapterError
from ..svd import energy_rank
from .base import Core, Method

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class SVFitConfig(AdapterConfig):
    method = "svfit"
    rank_rule = True
    r: int | float | None = 32  # None (or energy given without r): per matrix, the smallest r keeping `energy`
    energy: float = 0.99
    energy_measure: str = "squared"  # "squared": Σσ²; "sum": Σσ
    placement: str = "none"

    def __post_init__(self) -> None:
        if self.is_given("energy") and not self.is_given("r"):
            self.r = None  # an energy given chooses the ranks by it
        if self.energy_measure not in ("squared", "sum"):
            raise AdapterError(f"energy_measure={self.energy_measure!r}: use 'squared' or 'sum'.")
        if self.placement != "none":
            raise AdapterError("SVFit trains the singular values themselves: placement must be 'none'.")
        super().__post_init__()


class SVFit(Method):
    config_cls = SVFitConfig
    default_lr = 1e-2

    def rank(self, config: SVFitConfig, W: torch.Tensor) -> int:
        if config.r is None:
            return energy_rank(W, config.energy, config.energy_measure)
        return config.resolve_rank(*W.shape)

    def scale(self, config: SVFitConfig, r: int) -> float:
        return 1.0

    def init_params(
        self, config: SVFitConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        return {"sigma": basis.S.to(dtype).clone()}

    def param_shapes(
        self, config: SVFitConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        return {"sigma": (r,)}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        sigma = core["sigma"]
        return [Term(1.0, [sigma - basis.S.to(sigma.dtype)], left=[basis.B], right=[basis.A])]

    def fit(self, core, basis: OuterBasis | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        L, R = basis.B.double(), basis.A.double()  # ΔW = L·diag(x)·R: normal equations of x
        gram = (L.T @ L) * (R @ R.T)
        rhs = torch.einsum("di,dk,ik->i", L, target, R)
        return {"sigma": basis.S.double() + torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]}
