"""SVFit (arXiv 2409.05926): train only the top-r singular values σ of W0 = U_r Σ_r V_rᵀ + W_e.

The forward W_e x + U_r (σ ⊙ V_rᵀ x) is computed as W0 x + U_r ((σ − Σ_r) ⊙ V_rᵀ x): the same in real arithmetic,
exactly W0 at init, and it keeps the base weight shared and untouched. The rank is fixed, or per matrix the
smallest r keeping `energy` of the spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from ..errors import AdapterError
from ..svd import energy_rank
from .base import AdapterCore, Method


@dataclass
class SVFitConfig(AdapterConfig):
    method = "svfit"
    r: int | float | None = None  # None: choose per matrix by the energy threshold
    energy: float = 0.99
    energy_measure: str = "squared"  # "squared": Σσ²; "sum": Σσ
    placement: str = "none"

    def __post_init__(self) -> None:
        if self.energy_measure not in ("squared", "sum"):
            raise AdapterError(f"energy_measure={self.energy_measure!r}: use 'squared' or 'sum'.")
        if self.placement != "none":
            raise AdapterError("SVFit trains the singular values themselves: placement must be 'none'.")
        super().__post_init__()


class SVFit(Method):
    name = "svfit"
    config_cls = SVFitConfig

    def rank(self, config, W):
        if config.r is None:
            return energy_rank(W, config.energy, config.energy_measure)
        return config.resolve_rank(*W.shape)

    def scale(self, config, r):
        return 1.0

    def init_params(self, config, W, basis, r, dtype):
        return {"sigma": basis.S.to(dtype).clone()}

    def terms(self, core: AdapterCore, basis):
        return [(1.0, [basis.B, core["sigma"] - basis.S.to(core["sigma"].dtype), basis.A])]

    def stack_parts(self, core, basis):
        return [core["sigma"] - basis.S.to(core["sigma"].dtype)]

    def apply_stacked(self, parts, h):
        return h * parts[0].to(h.dtype).unsqueeze(1)
