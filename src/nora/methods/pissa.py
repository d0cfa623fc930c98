"""PiSSA: B = U_r Σ^½ and A = Σ^½ V_rᵀ both train over the residual W0 − s·B0·A0.

The base weight is never rewritten: the layer adds s·(B·A − B0·A0), which equals the residual form exactly in
real arithmetic, keeps W0 shared with other adapters, and unloads to the untouched original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..chain import Term
from ..config import AdapterConfig
from .base import Core, Method, low_rank_split

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class PissaConfig(AdapterConfig):
    method = "pissa"
    r: int | float = 16  # alpha None: alpha = r, s = 1 on every layer (a lowered rank too)


class PiSSA(Method):
    config_cls = PissaConfig
    default_lr = 2e-4

    def placement(self, config: PissaConfig) -> str:
        return "sqrt"

    def init_params(
        self, config: PissaConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        return {"lora_A": basis.A.to(dtype).clone(), "lora_B": basis.B.to(dtype).clone()}

    def param_shapes(
        self, config: PissaConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        d, k = W.shape
        return {"lora_A": (r, k), "lora_B": (d, r)}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        s = core.scale
        return [Term(s, [core["lora_B"], core["lora_A"]]), Term(-s, [], right=[basis.B, basis.A])]

    def fit(self, core, basis: OuterBasis | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        principal = basis.B.double() @ basis.A.double()  # B·A = B0·A0 + target / s
        B, A = low_rank_split(principal + target / core.scale, core.r)
        return {"lora_B": B, "lora_A": A}
